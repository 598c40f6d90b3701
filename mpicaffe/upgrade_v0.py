"""Caffe's V0 -> V1 net upgrade (UpgradeV0Net), as pure functions on protobuf messages.

A V0 net (Caffe's oldest format) nests each layer in `layers { layer { name type ... } bottom top }`,
with a type string ("conv", "innerproduct") and flat fields (num_output, kernelsize, batchsize)
that V1 moved into per-type parameter messages; "padding" layers were separate layers then. This
is the first step of mpicaffe.upgrade.upgrade_net, which also re-exports these functions. Each
follows a function of Caffe's src/caffe/util/upgrade_proto.cpp (BVLC Caffe, 2018 master):

============================================  ====================================================
here                                          Caffe
============================================  ====================================================
``net_needs_v0_to_v1_upgrade``                ``NetNeedsV0ToV1Upgrade``
``upgrade_v0_net``                            ``UpgradeV0Net``
``merge_v0_padding_layers``                   ``UpgradeV0PaddingLayers``
``upgrade_v0_layer``                          ``UpgradeV0LayerParameter``
``v0_layer_type_to_v1``                       ``UpgradeV0LayerType``
============================================  ====================================================

No function changes its argument. Fields that mean nothing for a layer's type come back as
problem lines, as Caffe logs them; where Caffe aborts, ``UserError`` is raised.
"""
from __future__ import annotations

from google.protobuf.message import Message

from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2

NetParameter = caffe_pb2.NetParameter
V1LayerParameter = caffe_pb2.V1LayerParameter


def _assign(target: Message, field: str, value) -> None:
    """Set, append to or copy into `target.field`, whichever its kind asks for."""
    descriptor = target.DESCRIPTOR.fields_by_name[field]
    if descriptor.is_repeated:
        getattr(target, field).append(value)
    elif descriptor.message_type is not None:
        getattr(target, field).CopyFrom(value)
    else:
        setattr(target, field, value)


_V0_TYPE_TO_V1 = {
    "accuracy": "ACCURACY",
    "bnll": "BNLL",
    "concat": "CONCAT",
    "conv": "CONVOLUTION",
    "data": "DATA",
    "dropout": "DROPOUT",
    "euclidean_loss": "EUCLIDEAN_LOSS",
    "flatten": "FLATTEN",
    "hdf5_data": "HDF5_DATA",
    "hdf5_output": "HDF5_OUTPUT",
    "im2col": "IM2COL",
    "images": "IMAGE_DATA",
    "infogain_loss": "INFOGAIN_LOSS",
    "innerproduct": "INNER_PRODUCT",
    "lrn": "LRN",
    "multinomial_logistic_loss": "MULTINOMIAL_LOGISTIC_LOSS",
    "pool": "POOLING",
    "relu": "RELU",
    "sigmoid": "SIGMOID",
    "softmax": "SOFTMAX",
    "softmax_loss": "SOFTMAX_LOSS",
    "split": "SPLIT",
    "tanh": "TANH",
    "window_data": "WINDOW_DATA",
}

# V0 field -> {V0 layer type accepting it: (V1 *_param field, field inside it)}. A field set on a
# layer of any other type is dropped with an error, as Caffe does; None copies the whole message.
_V0_TYPED_FIELDS: dict[str, dict[str, tuple[str, str | None]]] = {
    "num_output": {"conv": ("convolution_param", "num_output"),
                   "innerproduct": ("inner_product_param", "num_output")},
    "biasterm": {"conv": ("convolution_param", "bias_term"),
                 "innerproduct": ("inner_product_param", "bias_term")},
    "weight_filler": {"conv": ("convolution_param", "weight_filler"),
                      "innerproduct": ("inner_product_param", "weight_filler")},
    "bias_filler": {"conv": ("convolution_param", "bias_filler"),
                    "innerproduct": ("inner_product_param", "bias_filler")},
    "pad": {"conv": ("convolution_param", "pad"), "pool": ("pooling_param", "pad")},
    "kernelsize": {"conv": ("convolution_param", "kernel_size"), "pool": ("pooling_param", "kernel_size")},
    "group": {"conv": ("convolution_param", "group")},
    "stride": {"conv": ("convolution_param", "stride"), "pool": ("pooling_param", "stride")},
    "pool": {"pool": ("pooling_param", "pool")},
    "dropout_ratio": {"dropout": ("dropout_param", "dropout_ratio")},
    "local_size": {"lrn": ("lrn_param", "local_size")},
    "alpha": {"lrn": ("lrn_param", "alpha")},
    "beta": {"lrn": ("lrn_param", "beta")},
    "k": {"lrn": ("lrn_param", "k")},
    "source": {"data": ("data_param", "source"),
               "hdf5_data": ("hdf5_data_param", "source"),
               "images": ("image_data_param", "source"),
               "window_data": ("window_data_param", "source"),
               "infogain_loss": ("infogain_loss_param", "source")},
    "batchsize": {"data": ("data_param", "batch_size"),
                  "hdf5_data": ("hdf5_data_param", "batch_size"),
                  "images": ("image_data_param", "batch_size"),
                  "window_data": ("window_data_param", "batch_size")},
    "rand_skip": {"data": ("data_param", "rand_skip"), "images": ("image_data_param", "rand_skip")},
    "shuffle_images": {"images": ("image_data_param", "shuffle")},
    "new_height": {"images": ("image_data_param", "new_height")},
    "new_width": {"images": ("image_data_param", "new_width")},
    "concat_dim": {"concat": ("concat_param", "concat_dim")},
    "det_fg_threshold": {"window_data": ("window_data_param", "fg_threshold")},
    "det_bg_threshold": {"window_data": ("window_data_param", "bg_threshold")},
    "det_fg_fraction": {"window_data": ("window_data_param", "fg_fraction")},
    "det_context_pad": {"window_data": ("window_data_param", "context_pad")},
    "det_crop_mode": {"window_data": ("window_data_param", "crop_mode")},
    "hdf5_output_param": {"hdf5_output": ("hdf5_output_param", None)},
}

# V0 fields that move to transform_param whatever the layer type.
_V0_TRANSFORM_FIELDS = {"scale": "scale", "meanfile": "mean_file", "cropsize": "crop_size", "mirror": "mirror"}


def net_needs_v0_to_v1_upgrade(net: NetParameter) -> bool:
    """True if any entry of `layers` holds a V0 `layer` message (Caffe's NetNeedsV0ToV1Upgrade)."""
    return any(entry.HasField("layer") for entry in net.layers)


def v0_layer_type_to_v1(v0_type: str, source: str = "<net>", layer_name: str = "") -> int:
    """The V1LayerParameter.LayerType value for a V0 type string such as "conv" or "innerproduct".

    An unknown type raises UserError, where Caffe's UpgradeV0LayerType aborts.
    """
    enum_name = _V0_TYPE_TO_V1.get(v0_type)
    if enum_name is None:
        raise UserError(f"{source}: layer '{layer_name}' has V0 type '{v0_type}', which no version of "
                        f"Caffe's V0 format defines; known V0 types: {', '.join(sorted(_V0_TYPE_TO_V1))}")
    return V1LayerParameter.LayerType.Value(enum_name)


def merge_v0_padding_layers(net: NetParameter, source: str = "<net>") -> NetParameter:
    """Fold each V0 "padding" layer into the conv or pool layer that reads its output.

    The padding layer disappears; its `pad` goes to the consumer, which reads the padding layer's
    input instead. Mirrors Caffe's UpgradeV0PaddingLayers, including its fatal checks (a bottom
    no earlier layer produced; padding feeding anything but a single-input conv or pool layer),
    which raise UserError here.
    """
    merged = NetParameter()
    merged.CopyFrom(net)
    merged.ClearField("layers")
    # Blob name -> index (in `net.layers`) of the layer that last wrote it; -1 for net inputs.
    last_writer: dict[str, int] = {name: -1 for name in net.input}
    for index, entry in enumerate(net.layers):
        v0 = entry.layer
        if v0.type != "padding":
            merged.layers.add().CopyFrom(entry)
        for bottom_index, blob in enumerate(entry.bottom):
            if blob not in last_writer:
                raise UserError(f"{source}: layer '{v0.name}' (V0 layer #{index}) reads blob '{blob}', "
                                "which no earlier layer or net input produces")
            writer_index = last_writer[blob]
            if writer_index == -1:
                continue
            writer = net.layers[writer_index]
            if writer.layer.type != "padding":
                continue
            if v0.type not in ("conv", "pool"):
                raise UserError(f"{source}: padding layer '{writer.layer.name}' feeds layer '{v0.name}' "
                                f"of type '{v0.type}'; V0 padding layers may only feed conv or pool layers")
            if len(entry.bottom) != 1:
                raise UserError(f"{source}: layer '{v0.name}' reads padding layer '{writer.layer.name}' "
                                "but has more than one bottom; a padded conv/pool layer takes one input")
            if len(writer.bottom) != 1 or len(writer.top) != 1:
                raise UserError(f"{source}: padding layer '{writer.layer.name}' must have exactly one "
                                "bottom and one top")
            consumer = merged.layers[len(merged.layers) - 1]
            consumer.layer.pad = writer.layer.pad
            consumer.bottom[bottom_index] = writer.bottom[0]
        for blob in entry.top:
            last_writer[blob] = index
    return merged


def upgrade_v0_layer(entry: V1LayerParameter, source: str = "<net>") -> tuple[V1LayerParameter, list[str]]:
    """Turn one V0 `layers { layer {...} bottom top }` entry into a V1 layer.

    Returns the V1 layer and a list of problems: V0 fields that mean nothing for the layer's
    type, which Caffe's UpgradeV0LayerParameter reports and drops. Only bottom, top and the V0
    `layer` message are read; any V1 field already on the entry is lost, as in Caffe.
    """
    upgraded = V1LayerParameter()
    upgraded.bottom.extend(entry.bottom)
    upgraded.top.extend(entry.top)
    problems: list[str] = []
    if not entry.HasField("layer"):
        return upgraded, problems
    v0 = entry.layer
    if v0.HasField("name"):
        upgraded.name = v0.name
    if v0.HasField("type"):
        upgraded.type = v0_layer_type_to_v1(v0.type, source, v0.name)
    for blob in v0.blobs:
        upgraded.blobs.add().CopyFrom(blob)
    upgraded.blobs_lr.extend(v0.blobs_lr)
    upgraded.weight_decay.extend(v0.weight_decay)
    for v0_field, targets in _V0_TYPED_FIELDS.items():
        if not v0.HasField(v0_field):
            continue
        target = targets.get(v0.type)
        if target is None:
            problems.append(f"Unknown parameter {v0_field} for layer type {v0.type} "
                            f"(layer '{v0.name}'); dropped")
            continue
        param_name, field = target
        value = getattr(v0, v0_field)
        param = getattr(upgraded, param_name)
        if field is None:
            param.CopyFrom(value)
        elif v0_field == "pool":
            method = caffe_pb2.V0LayerParameter.PoolMethod.Name(value)
            param.pool = caffe_pb2.PoolingParameter.PoolMethod.Value(method)
        else:
            _assign(param, field, value)
    for v0_field, field in _V0_TRANSFORM_FIELDS.items():
        if v0.HasField(v0_field):
            setattr(upgraded.transform_param, field, getattr(v0, v0_field))
    return upgraded, problems


def upgrade_v0_net(net: NetParameter, source: str = "<net>") -> tuple[NetParameter, list[str]]:
    """Upgrade a V0 net to V1 layers; returns the net and the problems met (Caffe's UpgradeV0Net).

    Like Caffe, only the name, layers, input, input_dim and force_backward survive.
    """
    padded = merge_v0_padding_layers(net, source)
    upgraded = NetParameter()
    if padded.HasField("name"):
        upgraded.name = padded.name
    problems: list[str] = []
    for entry in padded.layers:
        layer, layer_problems = upgrade_v0_layer(entry, source)
        upgraded.layers.add().CopyFrom(layer)
        problems.extend(layer_problems)
    upgraded.input.extend(padded.input)
    upgraded.input_dim.extend(padded.input_dim)
    if padded.HasField("force_backward"):
        upgraded.force_backward = padded.force_backward
    return upgraded, problems
