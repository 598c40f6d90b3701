"""Data layers that read no files: Input, DummyData and MemoryData.

Their tops are what the user gives (Input's blobs, MemoryData's `set_input_arrays`) or what
fillers draw (DummyData); there is no reader thread and nothing to shard.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from mpicaffe.backends.engine.fillers import fill
from mpicaffe.backends.engine.layers import register
from mpicaffe.backends.engine.layers.base import Layer
from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2

log = logging.getLogger(__name__)


@register
class InputLayer(Layer):
    """Caffe's Input layer: tops the user fills (pycaffe's net.blobs[...].data); never computed."""

    type = "Input"
    min_bottoms = max_bottoms = 0
    min_tops = 1
    holds_inputs = True

    def setup(self, bottoms: list[torch.Tensor]) -> None:
        shapes = self.param.input_param.shape
        num_top = len(self.param.top)
        if len(shapes) not in (0, 1, num_top):
            raise self.error(f"input_param.shape must be given once, once per top blob, or not at all: "
                             f"{num_top} tops vs. {len(shapes)} shapes")
        self.shapes: list[tuple[int, ...] | None] = []
        for i in range(num_top):
            if not shapes:
                self.shapes.append(None)
                continue
            dims = tuple(int(d) for d in shapes[0 if len(shapes) == 1 else i].dim)
            if any(d < 0 for d in dims):
                raise self.error(f"input_param.shape {dims} has a negative dimension")
            self.shapes.append(dims)

    def forward(self, bottoms: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.infer_tops(bottoms)

    def infer_tops(self, bottoms: list[torch.Tensor]) -> list[torch.Tensor]:
        # a top without a shape stays empty until the user reshapes it, as Caffe's unshaped blob
        return [torch.zeros(s if s is not None else (0,), device=self.device) for s in self.shapes]


@register
class DummyDataLayer(Layer):
    """Caffe's DummyData layer: tops filled by fillers; constant fillers fill once, others every forward."""

    type = "DummyData"
    min_bottoms = max_bottoms = 0
    min_tops = 1

    def setup(self, bottoms: list[torch.Tensor]) -> None:
        p = self.param.dummy_data_param
        num_top = len(self.param.top)
        num_fillers = len(p.data_filler)
        if num_fillers not in (0, 1, num_top):
            raise self.error(f"Number of data fillers must be 0, 1 or equal to the number of tops: {num_top}; "
                             f"you specified {num_fillers} data fillers.")
        legacy = {f: list(getattr(p, f)) for f in ("num", "channels", "height", "width")}
        if any(legacy.values()):
            if len(p.shape):
                raise self.error("Both shape and legacy fields were specified")
            for field, values in legacy.items():
                if len(values) not in (1, num_top):
                    raise self.error(f"Must specify '{field}' once, or once per top blob ({num_top}); "
                                     f"specified {len(values)}.")
            self.shapes = [tuple(int(v[0] if len(v) == 1 else v[i]) for v in legacy.values())
                           for i in range(num_top)]
        else:
            if len(p.shape) not in (1, num_top):
                raise self.error(f"Must specify 'shape' once, or once per top blob ({num_top}); "
                                 f"specified {len(p.shape)}.")
            self.shapes = [tuple(int(d) for d in p.shape[0 if len(p.shape) == 1 else i].dim)
                           for i in range(num_top)]
        if num_fillers == 0:
            fillers = [caffe_pb2.FillerParameter(type="constant", value=0)] * num_top
        else:
            fillers = [p.data_filler[0 if num_fillers == 1 else i] for i in range(num_top)]
        self.fillers = fillers
        # Caffe's refill_: a top with a constant filler is filled once here and never again
        self._constant: list[torch.Tensor | None] = []
        for shape, filler in zip(self.shapes, fillers):
            if filler.type == "constant":
                self._constant.append(self._fill(torch.zeros(shape, device=self.device), filler))
            else:
                self._constant.append(None)

    def _fill(self, t: torch.Tensor, filler: caffe_pb2.FillerParameter) -> torch.Tensor:
        try:
            return fill(t, filler)
        except UserError as e:
            raise self.error(str(e)) from None

    def forward(self, bottoms: list[torch.Tensor]) -> list[torch.Tensor]:
        return [c if c is not None else self._fill(torch.empty(s, device=self.device), f)
                for c, s, f in zip(self._constant, self.shapes, self.fillers)]

    def infer_tops(self, bottoms: list[torch.Tensor]) -> list[torch.Tensor]:
        return [c if c is not None else torch.zeros(s, device=self.device)
                for c, s in zip(self._constant, self.shapes)]


@register
class MemoryDataLayer(Layer):
    """Caffe's MemoryData layer: batches from arrays given with `set_input_arrays`, wrapping around."""

    type = "MemoryData"
    min_bottoms = max_bottoms = 0
    min_tops = max_tops = 2

    def setup(self, bottoms: list[torch.Tensor]) -> None:
        p = self.param.memory_data_param
        self.batch_size, self.channels, self.height, self.width = (
            int(p.batch_size), int(p.channels), int(p.height), int(p.width))
        if self.batch_size * self.channels * self.height * self.width <= 0:
            raise self.error("batch_size, channels, height, and width must be specified and positive in "
                             "memory_data_param")
        if self.param.HasField("transform_param"):
            log.warning("layer '%s': MemoryData does not transform array data given by set_input_arrays",
                        self.name)
        self._data: np.ndarray | None = None
        self._labels: np.ndarray | None = None
        self._pos = 0

    def set_input_arrays(self, data: np.ndarray, labels: np.ndarray) -> None:
        """Use `data` (N, C, H, W) float32 and `labels` (N,) or (N, 1, 1, 1) float32 from now on.

        As pycaffe's Net.set_input_arrays: the arrays are used in place, not copied, and N must be
        a multiple of batch_size. The next forward returns the first batch.
        """
        if isinstance(labels, np.ndarray) and labels.ndim == 1:
            labels = labels[:, np.newaxis, np.newaxis, np.newaxis]
        for name, array, dims in (("data array", data, (self.channels, self.height, self.width)),
                                  ("labels array", labels, (1, 1, 1))):
            if not isinstance(array, np.ndarray):
                raise self.error(f"{name} must be a numpy array")
            if not array.flags.c_contiguous:
                raise self.error(f"{name} must be C contiguous")
            if array.ndim != 4:
                raise self.error(f"{name} must be 4-d")
            if array.dtype != np.float32:
                raise self.error(f"{name} must be float32, got {array.dtype}")
            for axis, what in enumerate(("channels", "height", "width")):
                if array.shape[axis + 1] != dims[axis]:
                    raise self.error(f"{name} has wrong number of {what}: {array.shape[axis + 1]} "
                                     f"(expected {dims[axis]})")
        if data.shape[0] != labels.shape[0]:
            raise self.error("data and labels must have the same first dimension")
        if data.shape[0] == 0 or data.shape[0] % self.batch_size:
            raise self.error(f"first dimensions of input arrays must be a multiple of batch size "
                             f"{self.batch_size}; got {data.shape[0]}")
        self._data, self._labels = data, labels.reshape(-1)
        self._pos = 0

    def forward(self, bottoms: list[torch.Tensor]) -> list[torch.Tensor]:
        if self._data is None:
            raise self.error("call set_input_arrays(data, labels) before the first forward "
                             "(MemoryDataLayer needs to be initialized by calling Reset)")
        b, pos = self.batch_size, self._pos
        data = _shared_tensor(self._data[pos:pos + b]).to(self.device)
        # Caffe's Forward_cpu reshapes the label top to (batch_size, 1, 1, 1) though setup made it 1-D
        labels = _shared_tensor(self._labels[pos:pos + b]).reshape(b, 1, 1, 1).to(self.device)
        self._pos = (pos + b) % self._data.shape[0]
        return [data, labels]

    def infer_tops(self, bottoms: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.zeros(self.batch_size, self.channels, self.height, self.width, device=self.device),
                torch.zeros(self.batch_size, device=self.device)]


def _shared_tensor(array: np.ndarray) -> torch.Tensor:
    # the user's array in place (Caffe points the top at it); a read-only one is copied
    return torch.from_numpy(array) if array.flags.writeable else torch.tensor(array)
