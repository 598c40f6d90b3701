"""Blob: a named N-d array with data and diff, as pycaffe shows it (`.data`, `.diff` numpy views)."""
from __future__ import annotations

import numpy as np
import torch


class Blob:
    """A Caffe blob over torch tensors.

    `data` and `diff` are numpy views of the tensors where they live on the CPU, so pycaffe-style
    in-place writes (`net.blobs['data'].data[...] = x`) reach the engine. `tensor` is the data
    tensor the last forward produced; `grad_tensor` is the one whose gradient is this blob's diff
    (for an in-place chain, the first producer's output, as Caffe's in-place backward leaves it).
    """

    def __init__(self, shape=(), device: torch.device | str = "cpu", dtype=torch.float32):
        self.tensor = torch.zeros(tuple(shape), dtype=dtype, device=device)
        self.grad_tensor: torch.Tensor | None = None
        self._diff: torch.Tensor | None = None

    @classmethod
    def over(cls, data: torch.Tensor, diff: torch.Tensor) -> Blob:
        """A blob whose data and diff are the given tensors (parameter blobs of a net)."""
        blob = cls.__new__(cls)
        blob.tensor = data
        blob.grad_tensor = None
        blob._diff = diff
        return blob

    # --- shape ---
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    @property
    def count(self) -> int:
        return self.tensor.numel()

    def _legacy(self, axis: int) -> int:
        # Caffe's LegacyShape: at most 4 axes; an axis past the last counts as 1
        shape = self.shape
        if len(shape) > 4:
            raise ValueError("num/channels/height/width are for blobs of at most 4 axes")
        return shape[axis] if axis < len(shape) else 1

    num = property(lambda self: self._legacy(0))
    channels = property(lambda self: self._legacy(1))
    height = property(lambda self: self._legacy(2))
    width = property(lambda self: self._legacy(3))

    def reshape(self, *shape: int) -> None:
        """Reshape (new zeroed storage when the count changes), as pycaffe's Blob.reshape."""
        shape = tuple(int(s) for s in shape)
        if shape == self.shape:
            return
        self.tensor = torch.zeros(shape, dtype=self.tensor.dtype, device=self.tensor.device)
        self.grad_tensor = None
        self._diff = None

    # --- data and diff ---
    @property
    def data(self) -> np.ndarray:
        return _numpy_view(self.tensor)

    @data.setter
    def data(self, value) -> None:
        self.data[...] = value

    @property
    def diff(self) -> np.ndarray:
        return _numpy_view(self.diff_tensor)

    @diff.setter
    def diff(self, value) -> None:
        self.diff[...] = value

    @property
    def diff_tensor(self) -> torch.Tensor:
        """The diff as a tensor: the autograd gradient after backward, else a zero buffer."""
        g = self.grad_tensor.grad if self.grad_tensor is not None else None
        if g is not None and g.shape == self.tensor.shape:
            return g
        if self._diff is None or self._diff.shape != self.tensor.shape:
            self._diff = torch.zeros_like(self.tensor)
        return self._diff

    def __repr__(self) -> str:
        return f"Blob(shape={self.shape})"


def _numpy_view(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.device.type != "cpu":
        # a copy: writes to it do not reach the device (documented pycaffe difference on GPU)
        return t.cpu().numpy()
    return t.numpy()
