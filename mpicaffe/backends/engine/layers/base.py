"""The Layer base class of the built-in engine.

A layer states Caffe's forward formula in torch ops; autograd gives its backward. Its parameter
blobs (`self.blobs`) have Caffe's shapes and order, so .caffemodel blobs load in place.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2


class Layer:
    """One Caffe layer.

    Subclasses set `type` and the bottom/top count limits, and implement `setup` (create
    parameter blobs from the bottom shapes) and `forward` (bottoms -> tops). Layers with side
    effects in forward (reading data, running statistics, random masks) override `infer_tops`.
    """

    type: ClassVar[str] = ""
    min_bottoms: ClassVar[int] = 0
    max_bottoms: ClassVar[int | None] = None
    min_tops: ClassVar[int] = 0
    max_tops: ClassVar[int | None] = None
    # Caffe's AllowForceBackward: False for bottoms that are labels or indices
    allow_force_backward: ClassVar[bool | tuple[bool, ...]] = True
    # Caffe's backward reads the bottom, which an in-place top has overwritten, so Caffe's gradient
    # is wrong in place; the engine's is the true one (the net warns)
    caffe_in_place_backward_is_wrong: ClassVar[bool] = False

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device, source: str = ""):
        self.param = param
        self.phase = phase
        self.device = device
        self.source = source
        self.blobs: list[torch.Tensor] = []
        # whether each blob gets a gradient (False for statistics such as BatchNorm's)
        self.blob_learnable: list[bool] = []

    @property
    def name(self) -> str:
        return self.param.name

    def error(self, message: str) -> UserError:
        """A UserError naming the file and this layer."""
        where = f"{self.source}: " if self.source else ""
        return UserError(f"{where}layer '{self.name}' ({self.type}): {message}")

    def check_counts(self) -> None:
        """Caffe's ExactNum/MinNum/MaxNum checks on bottoms and tops."""
        for what, n, lo, hi in (("bottom", len(self.param.bottom), self.min_bottoms, self.max_bottoms),
                                ("top", len(self.param.top), self.min_tops, self.max_tops)):
            if n < lo or (hi is not None and n > hi):
                want = f"exactly {lo}" if lo == hi else (f"{lo} to {hi}" if hi is not None else f"at least {lo}")
                raise self.error(f"takes {want} {what} blob(s), got {n}")

    def add_blob(self, shape, filler: caffe_pb2.FillerParameter | None = None, learnable: bool = True,
                 value: float = 0.0) -> torch.Tensor:
        """Create a parameter blob of `shape`, filled by `filler` (or with `value`)."""
        from mpicaffe.backends.engine.fillers import fill

        t = torch.full(tuple(int(s) for s in shape), float(value), dtype=torch.float32, device=self.device)
        if filler is not None:
            try:
                fill(t, filler)
            except UserError as e:
                raise self.error(str(e)) from None
        self.blobs.append(t)
        self.blob_learnable.append(learnable)
        return t

    def setup(self, bottoms: list[torch.Tensor]) -> None:
        """Check parameters against the first bottoms' shapes and create parameter blobs."""

    def forward(self, bottoms: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def infer_tops(self, bottoms: list[torch.Tensor]) -> list[torch.Tensor]:
        """Tops as `forward` would shape them, with no side effects (no data read, no state)."""
        with torch.no_grad():
            return self.forward(bottoms)

    def default_loss_weight(self, top_index: int) -> float:
        """Caffe: a loss layer's first top has loss weight 1 unless set; others 0."""
        return 1.0 if self.type.endswith("Loss") and top_index == 0 else 0.0


def check_axis(layer: Layer, axis: int, num_axes: int, what: str = "axis") -> int:
    """Caffe's Blob::CanonicalAxisIndex: allow negative axes, error if out of range."""
    if not -num_axes <= axis < num_axes:
        raise layer.error(f"{what} {axis} out of range for a {num_axes}-axis blob")
    return axis % num_axes
