"""Mixed precision for the engine (`--precision fp32|bf16|fp16`): autocast and fp16 loss scaling.

fp32 is Caffe's arithmetic and the default. bf16 and fp16 run each net's forward (and so its
backward) under torch.autocast for the net's device, while the weights, the flat gradient
buffer, the solver history and the update stay float32: gradient averaging across ranks and
snapshots (Caffe-readable float32) are the same as with fp32. Layers whose results are
statistics or scores run in float32 under autocast (FLOAT32_LAYERS): CPU autocast would leave
softmax, sums and means in the low precision. fp16, whose range is small, also scales the loss
by a factor that LossScaler adjusts as torch.amp.GradScaler does.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

from mpicaffe.errors import UserError

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# layers computed in float32 under autocast: losses and Accuracy (scores averaged over a batch),
# BatchNorm (its moving averages are float32 blobs), LRN and MVN (sums of squares), Softmax,
# ArgMax (indices), RNN and LSTM (their inner nets are not cast), and Python layers (they read
# `.data` as numpy arrays, which have no bfloat16)
FLOAT32_LAYERS = {"Accuracy", "ArgMax", "BatchNorm", "LRN", "LSTM", "MVN", "Python", "RNN", "Softmax"}
# layers whose bottoms are cast to the low precision: they cast their weights to the bottom's
# dtype, so that weights, bottom and their own backward (autograd Functions that autocast does
# not reach) agree, where a float32 bottom (data, a float32 layer's top) would not
LOW_PRECISION_LAYERS = {"Convolution", "Deconvolution", "InnerProduct"}


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The dtype the nets' forward autocasts to for `precision` on `device` (None for fp32).

    fp16 on a CPU is accepted (torch autocasts the engine's layers to float16 on the CPU), but it
    is no faster than fp32 there: it checks a loss-scaled run before it goes to a GPU."""
    if precision not in _DTYPES:
        raise UserError(f"--precision {precision}: unknown precision (use one of {', '.join(PRECISIONS)})")
    device = torch.device(device)
    dtype = _DTYPES[precision]
    if dtype is not None and not torch.amp.autocast_mode.is_autocast_available(device.type):
        raise UserError(f"--precision {precision}: torch {torch.__version__} has no autocast for {device.type} "
                        "devices; use --precision fp32")
    return dtype


def bottom_dtype(layer_type: str, autocast: torch.dtype | None) -> torch.dtype | None:
    """The dtype a layer's floating-point bottoms are cast to under autocast to `autocast`: float32
    (and the layer runs with autocast off) for FLOAT32_LAYERS and losses, `autocast` for
    LOW_PRECISION_LAYERS, else None (left as they come)."""
    if autocast is None:
        return None
    if layer_type in FLOAT32_LAYERS or layer_type.endswith("Loss"):
        return torch.float32
    return autocast if layer_type in LOW_PRECISION_LAYERS else None


class LossScaler:
    """Dynamic loss scaling for fp16 over the engine's flat gradient buffer (GradScaler's rule).

    Backward runs with the loss multiplied by `scale`. Before the update, `unscale_(flat_diff)`
    looks for a non-finite gradient: if there is one (on any rank, with `agree`) the update is
    skipped and `scale` halved; otherwise the buffer is divided by `scale` (a power of two, so
    exactly) and after `growth_interval` such steps in a row `scale` doubles. Scaling is linear,
    so iter_size accumulation and averaging across ranks may both come before unscale_.
    """

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        self.scale = float(init_scale)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.good_steps = 0  # finite steps since the scale last changed
        self.skipped = 0     # updates skipped so far

    def unscale_(self, flat_diff: torch.Tensor, agree: Callable[[bool], bool] | None = None) -> bool:
        """Unscale `flat_diff` in place and return True, or, where a gradient is not finite, return
        False (skip the update) with the scale lowered. `agree(found)` returns whether any rank
        found a non-finite gradient, so that every rank skips the same steps."""
        # a sum is finite only if every element is (one pass, no temporary); an overflowing sum of
        # finite values counts as an overflow, which only lowers the scale
        found = not math.isfinite(float(flat_diff.sum()))
        if agree is not None:
            found = bool(agree(found))
        if found:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            self.skipped += 1
            return False
        flat_diff.mul_(1.0 / self.scale)
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0
        return True
