"""Nets written in Python, as pycaffe's `caffe.net_spec`: `L.Convolution(n.data, kernel_size=5)`.

    from mpicaffe import caffe
    from mpicaffe.caffe import layers as L, params as P
    n = caffe.NetSpec()
    n.data, n.label = L.Data(source="train_lmdb", backend=P.Data.LMDB, batch_size=64, ntop=2)
    n.pool1 = L.Pooling(n.data, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    print(n.to_proto())        # a caffe_pb2.NetParameter, text identical to pycaffe's

A keyword argument sets the layer's own parameter message where it has that field
(`kernel_size` goes to `convolution_param`), else the LayerParameter field of that name
(`loss_weight`, `include`, `name`); a name ending in `param` (`param`, `transform_param`,
`python_param`) always sets the LayerParameter field. Lists fill repeated fields (a single value
is a one-element list), dicts fill messages. `ntop=N` gives N tops (0: the layer itself),
`in_place=True` writes the tops over the bottoms. Tops assigned to a NetSpec take their
attribute names; the others are named for their layer type and a count (`Convolution1`), as
pycaffe names them. Names are assigned the same way pycaffe assigns them, so the generated
prototxt is the same text.
"""
from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any

from google.protobuf.message import Message

from mpicaffe.proto import caffe_pb2

_PARAM_SUFFIX = "_param"


def param_name_dict() -> dict[str, str]:
    """Each layer type's parameter field prefix: {"Convolution": "convolution",
    "InnerProduct": "inner_product", "Transformation": "transform", ...}.

    Read off LayerParameter's `*_param` message fields: the key is the field's message type
    without `Parameter`, the value the field name without `_param`.
    """
    names = {}
    for field in caffe_pb2.LayerParameter.DESCRIPTOR.fields:
        if field.name.endswith(_PARAM_SUFFIX) and field.message_type is not None:
            names[field.message_type.name.removesuffix("Parameter")] = field.name.removesuffix(_PARAM_SUFFIX)
    return names


_PARAM_NAMES = param_name_dict()


def assign_proto(message: Message, name: str, value: Any) -> None:
    """Set field `name` of `message` from a Python value: a list (or tuple) fills a repeated
    field, a dict fills a message (a list of dicts adds one message each), a single value given
    to a repeated field becomes a one-element list, anything else is assigned."""
    field = getattr(message, name)
    repeated = hasattr(field, "extend")
    if isinstance(value, tuple):
        value = list(value)
    if repeated and not isinstance(value, list):
        value = [value]
    if isinstance(value, list):
        if value and isinstance(value[0], dict):
            for item in value:
                sub = field.add()
                for key, v in item.items():
                    assign_proto(sub, key, v)
        else:
            field.extend(value)
    elif isinstance(value, dict):
        for key, v in value.items():
            assign_proto(field, key, v)
    elif isinstance(value, Message):
        field.CopyFrom(value)
    else:
        setattr(message, name, value)


class Top:
    """One output blob of a layer: `fn` is the layer's Function, `n` which of its tops."""

    def __init__(self, fn: Function, n: int):
        self.fn = fn
        self.n = n

    def to_proto(self) -> caffe_pb2.NetParameter:
        """A NetParameter with every layer this top needs, its blobs named automatically."""
        return to_proto(self)

    def _to_proto(self, layers: dict, names: dict, autonames: Counter) -> None:
        self.fn._to_proto(layers, names, autonames)


class Function:
    """One layer: its type, its input Tops and its keyword parameters.

    `ntop` and `in_place` are taken out of `params`; the rest become fields of the layer.
    """

    def __init__(self, type_name: str, inputs: tuple, params: dict):
        for index, bottom in enumerate(inputs):
            if not isinstance(bottom, Top):
                raise TypeError(f"{type_name} input {index} is not a Top (type is {type(bottom)}); "
                                f"pass tops (n.data, or what a layer function returned)")
        self.type_name = type_name
        self.inputs = inputs
        self.params = params
        self.ntop = params.pop("ntop", 1)
        self.in_place = params.pop("in_place", False)
        self.tops = tuple(Top(self, n) for n in range(self.ntop))

    def _auto_name(self, autonames: Counter) -> str:
        autonames[self.type_name] += 1
        return f"{self.type_name}{autonames[self.type_name]}"

    def _top_name(self, top: Top, names: dict, autonames: Counter) -> str:
        if top not in names:
            names[top] = top.fn._auto_name(autonames)
        return names[top]

    def _layer_name(self, names: dict, autonames: Counter) -> str:
        # pycaffe: a layer is named for its first top; a layer without tops for its type
        if self not in names:
            names[self] = (self._top_name(self.tops[0], names, autonames) if self.ntop > 0
                           else self._auto_name(autonames))
        return names[self]

    def _to_proto(self, layers: dict, names: dict, autonames: Counter) -> None:
        if self in layers:
            return
        bottoms = []
        for bottom in self.inputs:
            bottom._to_proto(layers, names, autonames)
            bottoms.append(layers[bottom.fn].top[bottom.n])
        layer = caffe_pb2.LayerParameter(type=self.type_name, bottom=bottoms)
        if self.in_place:
            layer.top.extend(bottoms)
        else:
            layer.top.extend(self._top_name(top, names, autonames) for top in self.tops)
        layer.name = self._layer_name(names, autonames)
        for key, value in self.params.items():
            self._assign(layer, key, value)
        layers[self] = layer

    def _assign(self, layer: caffe_pb2.LayerParameter, key: str, value: Any) -> None:
        prefix = _PARAM_NAMES.get(self.type_name)
        if not key.endswith("param") and prefix is not None:
            try:
                assign_proto(getattr(layer, prefix + _PARAM_SUFFIX), key, value)
                return
            except AttributeError:
                pass
        try:
            assign_proto(layer, key, value)
        except AttributeError:
            where = f"LayerParameter or {prefix}{_PARAM_SUFFIX}" if prefix else "LayerParameter"
            raise AttributeError(f"{self.type_name} layer: no field '{key}' in {where}") from None


class _MissingTop(AttributeError, KeyError):
    """A NetSpec has no top of that name (a KeyError, as in pycaffe, and an AttributeError,
    so that hasattr and copy work)."""

    def __str__(self) -> str:
        return str(self.args[0])


class NetSpec:
    """A net built by assigning Tops to attributes (`n.conv1 = L.Convolution(n.data, ...)`);
    `to_proto()` writes every layer those tops need, each top named for its attribute."""

    def __init__(self):
        super().__setattr__("tops", OrderedDict())

    def __setattr__(self, name: str, value: Top | Function) -> None:
        self.tops[name] = value

    def __getattr__(self, name: str) -> Top | Function:
        try:
            return self.__dict__["tops"][name]  # not self.tops: copy and pickle ask before __init__
        except KeyError:
            raise _MissingTop(f"this NetSpec has no top named '{name}'") from None

    def __setitem__(self, key: str, value: Top | Function) -> None:
        self.__setattr__(key, value)

    def __getitem__(self, key: str) -> Top | Function:
        return self.__getattr__(key)

    def to_proto(self) -> caffe_pb2.NetParameter:
        """The NetParameter holding every layer the assigned tops need, in assignment order."""
        names = {top: name for name, top in self.tops.items()}
        layers: dict = OrderedDict()
        autonames: Counter = Counter()
        for top in self.tops.values():
            top._to_proto(layers, names, autonames)
        return caffe_pb2.NetParameter(layer=list(layers.values()))


def to_proto(*tops: Top | Function) -> caffe_pb2.NetParameter:
    """A NetParameter with every layer the given tops need, blobs named automatically."""
    layers: dict = OrderedDict()
    names: dict = {}
    autonames: Counter = Counter()
    for top in tops:
        top._to_proto(layers, names, autonames)
    return caffe_pb2.NetParameter(layer=list(layers.values()))


class Layers:
    """`layers.Convolution(bottom, kernel_size=3)`: a function for every layer type, returning
    its Top (one top), a tuple of Tops (`ntop` > 1) or the Function itself (`ntop=0`)."""

    def __getattr__(self, type_name: str):
        if type_name.startswith("__"):
            raise AttributeError(type_name)

        def layer(*bottoms: Top, **params: Any):
            fn = Function(type_name, bottoms, params)
            if fn.ntop == 0:
                return fn
            return fn.tops[0] if fn.ntop == 1 else fn.tops

        layer.__name__ = type_name
        return layer


class _EnumValues:
    def __init__(self, message_name: str):
        self._message_name = message_name

    def __getattr__(self, value_name: str):
        if value_name.startswith("__"):
            raise AttributeError(value_name)
        return getattr(getattr(caffe_pb2, self._message_name), value_name)


class Parameters:
    """`params.Pooling.MAX`: the constants of `caffe_pb2.PoolingParameter`, for every layer type."""

    def __getattr__(self, type_name: str) -> _EnumValues:
        if type_name.startswith("__"):
            raise AttributeError(type_name)
        return _EnumValues(type_name + "Parameter")


layers = Layers()
params = Parameters()

__all__ = ["Function", "Layers", "NetSpec", "Parameters", "Top", "assign_proto", "layers",
           "param_name_dict", "params", "to_proto"]
