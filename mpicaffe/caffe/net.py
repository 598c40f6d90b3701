"""pycaffe's `caffe.Net` over the built-in engine."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from mpicaffe import prototxt
from mpicaffe.backends.engine.blob import Blob
from mpicaffe.backends.engine.net import Net as EngineNet
from mpicaffe.errors import UserError


class LayerView:
    """What pycaffe shows of a layer: `type` and its parameter `blobs`."""

    def __init__(self, net: EngineNet, index: int):
        self._net = net
        self._index = index

    @property
    def type(self) -> str:
        return self._net.layers[self._index].type

    @property
    def blobs(self) -> list[Blob]:
        layer = self._net.layers[self._index]
        return [self._net._param_blob(layer, j) for j in range(len(layer.blobs))]

    def __getattr__(self, name):
        # layer-specific extras (e.g. MemoryData's set_input_arrays) come from the engine layer
        return getattr(self._net.layers[self._index], name)


class Net:
    """A Caffe net, as pycaffe's `caffe.Net`.

    Net(network_file, phase, level=0, stages=None, weights=None), or the legacy
    Net(network_file, weights_file, phase).
    """

    def __init__(self, network_file: str, *args, level: int = 0, stages=None, weights: str | None = None,
                 phase: int | None = None, device: str | None = None):
        if len(args) == 2 and isinstance(args[0], str):
            weights, phase = args
        elif len(args) == 1:
            phase = args[0]
        elif args:
            raise TypeError("Net(network_file, phase, level=0, stages=None, weights=None) "
                            "or Net(network_file, weights_file, phase)")
        if phase is None:
            raise TypeError("Net needs a phase: caffe.TRAIN or caffe.TEST")
        from mpicaffe.caffe import _default_device

        param = prototxt.read_net(network_file)
        param = prototxt.net_for_phase(param, phase, level, tuple(stages or ()), network_file)
        self._net = EngineNet(param, device=device or _default_device(), source=network_file)
        if weights:
            self.copy_from(weights)

    @classmethod
    def _wrap(cls, engine_net: EngineNet) -> Net:
        net = cls.__new__(cls)
        net._net = engine_net
        return net

    # --- structure ---
    @property
    def blobs(self) -> OrderedDict[str, Blob]:
        return OrderedDict(self._net.blobs)

    @property
    def params(self) -> OrderedDict[str, list[Blob]]:
        return OrderedDict(self._net.params)

    @property
    def layers(self) -> list[LayerView]:
        return [LayerView(self._net, i) for i in range(len(self._net.layers))]

    @property
    def _layer_names(self) -> list[str]:
        return list(self._net.layer_names)

    @property
    def layer_dict(self) -> OrderedDict[str, LayerView]:
        return OrderedDict(zip(self._net.layer_names, self.layers))

    @property
    def inputs(self) -> list[str]:
        return list(self._net.inputs)

    @property
    def outputs(self) -> list[str]:
        return list(self._net.outputs)

    @property
    def top_names(self) -> OrderedDict[str, list[str]]:
        return OrderedDict(zip(self._net.layer_names, self._net._top_names))

    @property
    def bottom_names(self) -> OrderedDict[str, list[str]]:
        return OrderedDict(zip(self._net.layer_names, self._net._bottom_names))

    @property
    def blob_loss_weights(self) -> OrderedDict[str, float]:
        weights = OrderedDict((name, 0.0) for name in self._net.blobs)
        for tops, ws in zip(self._net._top_names, self._net.loss_weights):
            for name, w in zip(tops, ws):
                weights[name] = w
        return weights

    # --- running ---
    def _index(self, layer_name: str | None, default: int) -> int:
        if layer_name is None:
            return default
        if layer_name not in self._net.layer_names:
            raise UserError(f"net '{self._net.name}' has no layer '{layer_name}'")
        return self._net.layer_names.index(layer_name)

    def forward(self, blobs=None, start: str | None = None, end: str | None = None, **kwargs) -> dict:
        """Set input blobs from `kwargs`, run layers start..end, and return the output blobs
        (or `end`'s tops) plus any blobs named in `blobs`, as pycaffe does."""
        if kwargs:
            if not set(kwargs) <= set(self.inputs):
                raise UserError(f"input blob arguments {sorted(kwargs)} do not match net inputs {self.inputs}")
            for name, value in kwargs.items():
                value = np.asarray(value)
                blob = self._net.blobs[name]
                if value.shape[0] != blob.shape[0]:
                    raise UserError(f"input '{name}' is not batch sized ({value.shape[0]} vs {blob.shape[0]})")
                blob.data[...] = value
        first = self._index(start, 0)
        last = self._index(end, len(self._net.layers) - 1)
        self._net.forward(first, last)
        names = list(self._net._top_names[last]) if end is not None else list(self.outputs)
        names += [b for b in (blobs or []) if b not in names]
        return {name: self._net.blobs[name].data for name in names}

    def backward(self, diffs=None, start=None, end=None, **kwargs) -> dict:
        """Set output diffs from `kwargs`, backpropagate the last forward through the whole net,
        and return the input blobs' diffs plus any blobs named in `diffs`.

        The backward always runs over the whole net (autograd); `start`/`end` are not supported.
        """
        if start is not None or end is not None:
            raise UserError("the built-in engine backpropagates the whole net; backward(start=, end=) "
                            "is not supported")
        for name, value in kwargs.items():
            if name not in self.outputs:
                raise UserError(f"top diff arguments {sorted(kwargs)} do not match net outputs {self.outputs}")
            blob = self._net.blobs[name]
            if blob._diff is None or blob._diff.shape != blob.tensor.shape:
                blob._diff = torch.zeros_like(blob.tensor)
            blob._diff.copy_(torch.as_tensor(np.asarray(value, dtype=np.float32)))
        self._net.backward()
        names = list(self.inputs) + [b for b in (diffs or []) if b not in self.inputs]
        return {name: self._net.blobs[name].diff for name in names}

    def forward_all(self, blobs=None, **kwargs) -> dict:
        """Run forward over inputs of any length in batch-size chunks and concatenate the outputs."""
        names = list(self.outputs) + [b for b in (blobs or []) if b not in self.outputs]
        if not kwargs:
            return {k: v.copy() for k, v in self.forward(blobs=blobs).items()}
        n = len(next(iter(kwargs.values())))
        batch = self._net.blobs[next(iter(kwargs))].shape[0]
        outs: dict[str, list[np.ndarray]] = {name: [] for name in names}
        for i in range(0, n, batch):
            chunk = {k: np.asarray(v[i:i + batch]) for k, v in kwargs.items()}
            pad = batch - len(next(iter(chunk.values())))
            if pad:
                chunk = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in chunk.items()}
            result = self.forward(blobs=blobs, **chunk)
            for name in names:
                outs[name].append(result[name][:batch - pad].copy())
        return {name: np.concatenate(parts) for name, parts in outs.items()}

    def reshape(self) -> None:
        self._net.reshape()

    # --- weights ---
    def copy_from(self, path: str) -> None:
        """Load weights by layer name from a .caffemodel (or .caffemodel.h5)."""
        if path.endswith(".h5"):
            from mpicaffe.backends.engine import snapshot_io

            snapshot_io.copy_from_hdf5(self._net, path)
        else:
            self._net.copy_from(prototxt.read_net(path), path)

    def share_with(self, other: Net) -> None:
        self._net.share_trained_layers_with(other._net)

    def save(self, path: str) -> None:
        """Write the weights as a binary .caffemodel (on rank 0 alone under `mpicaffe python`)."""
        from mpicaffe.caffe import distributed

        if distributed.writes_files():
            prototxt.write_binary(self._net.to_proto(), path)

    def set_input_arrays(self, data: np.ndarray, labels: np.ndarray) -> None:
        """Feed a MemoryData net's first layer (pycaffe's Net.set_input_arrays)."""
        first = self._net.layers[0]
        if first.type != "MemoryData":
            raise UserError("set_input_arrays needs a MemoryData layer as the net's first layer")
        first.set_input_arrays(data, labels)
