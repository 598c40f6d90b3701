"""pycaffe's `caffe.Net` over the built-in engine."""
from __future__ import annotations

from collections import OrderedDict
from itertools import zip_longest

import numpy as np
import torch

from mpicaffe import prototxt
from mpicaffe.backends.engine import snapshot_io
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

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        """Set the layer up for these bottoms and shape the tops (pycaffe's Layer.setup)."""
        self._net.layers[self._index].setup([b.tensor for b in bottom])
        self.reshape(bottom, top)

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        """Give the tops the shapes this layer makes from these bottoms (pycaffe's Layer.reshape)."""
        tops = self._net.layers[self._index].infer_tops([b.tensor for b in bottom])
        for blob, t in zip(top, tops):
            blob.reshape(*t.shape)

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
        self._net.record_edges = True  # for backward(start=, end=)
        if weights:
            self.copy_from(weights)

    @classmethod
    def _wrap(cls, engine_net: EngineNet) -> Net:
        net = cls.__new__(cls)
        net._net = engine_net
        engine_net.record_edges = True
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

    @property
    def _blob_names(self) -> list[str]:
        return list(self._net.blobs)

    @property
    def _blobs(self) -> list[Blob]:
        return list(self._net.blobs.values())

    @property
    def _blob_loss_weights(self) -> list[float]:
        return list(self.blob_loss_weights.values())

    @property
    def _inputs(self) -> list[int]:
        names = self._blob_names
        return [names.index(n) for n in self._net.inputs]

    @property
    def _outputs(self) -> list[int]:
        names = self._blob_names
        return [names.index(n) for n in self._net.outputs]

    def _top_ids(self, i: int) -> list[int]:
        names = self._blob_names
        return [names.index(n) for n in self._net._top_names[i]]

    def _bottom_ids(self, i: int) -> list[int]:
        names = self._blob_names
        return [names.index(n) for n in self._net._bottom_names[i]]

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

    def _forward(self, start: int, end: int) -> float:
        """Run layers start..end by index; the weighted loss (pycaffe's Net._forward)."""
        return self._net.forward(start, end)

    def backward(self, diffs=None, start: str | None = None, end: str | None = None, **kwargs) -> dict:
        """Set output diffs from `kwargs`, backpropagate the last forward from layer `start` down
        to layer `end` (both included; the whole net by default), and return the diffs of `end`'s
        bottoms (or of the net inputs) plus any blobs named in `diffs`, as pycaffe does."""
        for name, value in kwargs.items():
            if name not in self.outputs:
                raise UserError(f"top diff arguments {sorted(kwargs)} do not match net outputs {self.outputs}")
            value = np.asarray(value, dtype=np.float32)
            blob = self._net.blobs[name]
            if value.shape[0] != blob.shape[0]:
                raise UserError(f"diff '{name}' is not batch sized ({value.shape[0]} vs {blob.shape[0]})")
            if blob._diff is None or blob._diff.shape != blob.tensor.shape:
                blob._diff = torch.zeros_like(blob.tensor)
            blob._diff.copy_(torch.as_tensor(value))
        if start is None and end is None:
            self._net.backward()
        else:
            self._backward(self._index(start, len(self._net.layers) - 1), self._index(end, 0))
        names = list(self._net._bottom_names[self._index(end, 0)]) if end is not None else list(self.inputs)
        names += [b for b in (diffs or []) if b not in names]
        return {name: self._net.blobs[name].diff for name in names}

    def _backward(self, start: int, end: int) -> None:
        """Backpropagate layer by layer from index `start` down to `end` (Caffe's BackwardFromTo)."""
        self._net.backward_from_to(start, end)

    # --- callbacks: f(i) around layer i of every forward and backward, as Caffe's NetCallback ---
    def before_forward(self, f) -> None:
        self._net.layer_callbacks["before_forward"].append(f)

    def after_forward(self, f) -> None:
        self._net.layer_callbacks["after_forward"].append(f)

    def before_backward(self, f) -> None:
        self._net.layer_callbacks["before_backward"].append(f)

    def after_backward(self, f) -> None:
        self._net.layer_callbacks["after_backward"].append(f)

    def _batch(self, blobs: dict):
        """Split {name: array} into the net's batch size, the last batch padded with zeros."""
        num = len(next(iter(blobs.values())))
        batch = next(iter(self._net.blobs.values())).shape[0]
        for i in range(0, num - num % batch, batch):
            yield {name: v[i:i + batch] for name, v in blobs.items()}
        rest = num % batch
        if rest:
            yield {name: np.concatenate([np.asarray(v[num - rest:]),
                                         np.zeros((batch - rest,) + np.asarray(v).shape[1:], np.float32)])
                   for name, v in blobs.items()}

    def forward_all(self, blobs=None, **kwargs) -> dict:
        """Run forward over inputs of any length in batch-size chunks and concatenate the outputs
        (and the blobs named in `blobs`), dropping the padding of the last chunk."""
        names = list(dict.fromkeys(list(self.outputs) + list(blobs or [])))
        if not kwargs:
            return {k: v.copy() for k, v in self.forward(blobs=blobs).items()}
        outs: dict[str, list[np.ndarray]] = {name: [] for name in names}
        for batch in self._batch(kwargs):
            result = self.forward(blobs=blobs, **batch)
            for name in names:
                outs[name].append(result[name].copy())
        n = len(next(iter(kwargs.values())))
        return {name: np.concatenate(parts)[:n] for name, parts in outs.items()}

    def forward_backward_all(self, blobs=None, diffs=None, **kwargs) -> tuple[dict, dict]:
        """forward and backward over inputs (and output diffs) of any length in batch-size chunks:
        the concatenated outputs plus `blobs`, and input diffs plus `diffs`, as pycaffe's."""
        out_names = list(dict.fromkeys(list(self.outputs) + list(blobs or [])))
        diff_names = list(dict.fromkeys(list(self.inputs) + list(diffs or [])))
        forward_in = {k: kwargs[k] for k in self.inputs if k in kwargs}
        backward_in = {k: kwargs[k] for k in self.outputs if k in kwargs}
        all_outs: dict[str, list[np.ndarray]] = {name: [] for name in out_names}
        all_diffs: dict[str, list[np.ndarray]] = {name: [] for name in diff_names}
        batches = zip_longest(self._batch(forward_in) if forward_in else (),
                              self._batch(backward_in) if backward_in else (), fillvalue={})
        for fb, bb in batches:
            outs = self.forward(blobs=blobs, **fb)
            grads = self.backward(diffs=diffs, **bb)
            for name in out_names:
                all_outs[name].append(outs[name].copy())
            for name in diff_names:
                all_diffs[name].append(grads[name].copy())
        n = len(next(iter(kwargs.values()))) if kwargs else None
        return ({name: np.concatenate(parts)[:n] for name, parts in all_outs.items()},
                {name: np.concatenate(parts)[:n] for name, parts in all_diffs.items()})

    def clear_param_diffs(self) -> None:
        """Zero every parameter diff (Caffe's Net::ClearParamDiffs)."""
        self._net.clear_param_diffs()

    def reshape(self) -> None:
        self._net.reshape()

    # --- weights ---
    def copy_from(self, path: str) -> None:
        """Load weights by layer name from a binary .caffemodel (whatever its name) or, for a
        name ending in .h5, Caffe's HDF5 weights, as Caffe's CopyTrainedLayersFrom."""
        snapshot_io.load_weights(self._net, path)

    def load_hdf5(self, path: str) -> None:
        """Load weights by layer name from Caffe's HDF5 weights file (Net::CopyTrainedLayersFromHDF5)."""
        snapshot_io.copy_from_hdf5(self._net, path)

    def share_with(self, other: Net) -> None:
        self._net.share_trained_layers_with(other._net)

    def save(self, path: str) -> None:
        """Write the weights as a binary .caffemodel (on rank 0 alone under `mpicaffe python`)."""
        from mpicaffe.caffe import distributed

        if distributed.writes_files():
            prototxt.write_binary(self._net.to_proto(), path)

    def save_hdf5(self, path: str) -> None:
        """Write the weights in Caffe's HDF5 layout, as its .caffemodel.h5 snapshots (Net::ToHDF5)."""
        from mpicaffe.caffe import distributed

        if distributed.writes_files():
            snapshot_io.write_caffemodel_hdf5(self._net, path)

    def set_input_arrays(self, data: np.ndarray, labels: np.ndarray) -> None:
        """Feed a MemoryData net's first layer (pycaffe's Net.set_input_arrays); labels may be 1-D."""
        if np.asarray(labels).ndim == 1:
            labels = np.ascontiguousarray(labels[:, np.newaxis, np.newaxis, np.newaxis])
        self._set_input_arrays(data, labels)

    def _set_input_arrays(self, data: np.ndarray, labels: np.ndarray) -> None:
        first = self._net.layers[0]
        if first.type != "MemoryData":
            raise UserError("set_input_arrays needs a MemoryData layer as the net's first layer")
        first.set_input_arrays(data, labels)
