"""What MPI reads and writes for a torch tensor: the one place that knows the tensor's device.

Every MPI collective on a tensor (the gradient buckets, the start-state broadcast, the recovery
broadcast, the weights checksum) goes through a HostBuffer, in one of three modes:

- "view" (CPU tensors): a numpy view of the tensor's own memory; nothing is copied.
- "device" (CUDA tensors, CUDA-aware MPI): the tensor itself, which mpi4py hands to MPI as a
  device pointer (DLPack / __cuda_array_interface__). MPI does not know CUDA streams, so the
  kernels that write the tensor must have finished first: `stage()` records an event and
  `ready()` says when it has passed.
- "stage" (CUDA tensors, MPI without CUDA support; any other device): a pinned host copy.
  `stage()` starts the device-to-host copy (an event marks its end), MPI works on the copy,
  and `unstage()` queues the copy back, ordered before whatever runs on the stream next.

`stage()`, `ready()` and `unstage()` cost nothing in "view" mode, so CPU training is unchanged.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess

import numpy as np
import torch

MODES = ("view", "device", "stage")
CUDA_AWARE_ENV = "MPICAFFE_CUDA_AWARE_MPI"  # "1" or "0": say whether MPI reads CUDA memory, skipping the probe


def exchange_mode(device: torch.device) -> str:
    """How MPI reaches a tensor on `device`: 'view', 'device' or 'stage' (module docstring)."""
    if device.type == "cpu":
        return "view"
    if device.type == "cuda" and cuda_aware_mpi():
        return "device"
    return "stage"


@functools.cache
def cuda_aware_mpi() -> bool:
    """Whether this MPI library reads and writes CUDA memory itself: $MPICAFFE_CUDA_AWARE_MPI if
    set, else mpi4py's MPI.Query_cuda_support() where it has it, else whether `ompi_info` says
    Open MPI was built with CUDA support (mpi_built_with_cuda_support). Asked once per process,
    and only when a CUDA tensor is exchanged."""
    forced = os.environ.get(CUDA_AWARE_ENV, "").strip().lower()
    if forced in ("0", "1", "true", "false", "yes", "no"):
        return forced in ("1", "true", "yes")
    from mpi4py import MPI

    query = getattr(MPI, "Query_cuda_support", None)
    if query is not None:
        return bool(query())
    return _ompi_built_with_cuda()


def _ompi_built_with_cuda() -> bool:
    ompi_info = shutil.which("ompi_info")
    if ompi_info is None:
        return False
    try:
        out = subprocess.run([ompi_info, "--parsable", "--all"], check=False, capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return re.search(r"built_with_cuda_support:value:true", out) is not None


def host_array(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's values as a numpy array, to read: its own memory on the CPU, a copy from any
    other device."""
    tensor = tensor.detach()
    return tensor.numpy() if tensor.device.type == "cpu" else tensor.cpu().numpy()


class HostBuffer:
    """MPI's side of one tensor (contiguous): `message` is what to pass to an mpi4py call.

    Around each call: `stage()` before (then wait until `ready()`, or call `wait_ready()`), and
    `unstage()` after a call that wrote into `message`. `part(lo, hi)` is the buffer of
    elements lo..hi, sharing this one's memory (the reducers' buckets)."""

    def __init__(self, tensor: torch.Tensor, mode: str | None = None, _host: torch.Tensor | None = None):
        tensor = tensor.detach()
        if not tensor.is_contiguous():
            raise ValueError("HostBuffer needs a contiguous tensor (a flat buffer or a slice of one)")
        self.tensor = tensor
        self.mode = mode or exchange_mode(tensor.device)
        if self.mode not in MODES:
            raise ValueError(f"HostBuffer mode {self.mode!r}: expected one of {', '.join(MODES)}")
        self.host: torch.Tensor | None = None
        if self.mode == "view":
            if tensor.device.type != "cpu":
                raise ValueError(f"HostBuffer: a tensor on {tensor.device} has no host view; use 'stage' or 'device'")
            self.message = tensor.numpy()
        elif self.mode == "device":
            self.message = tensor
        else:
            self.host = _host if _host is not None else torch.empty(
                tensor.shape, dtype=tensor.dtype, pin_memory=tensor.device.type == "cuda")
            self.message = self.host.numpy()
        self._event = None

    def part(self, lo: int, hi: int) -> HostBuffer:
        """The buffer of elements lo..hi of the (flattened) tensor, over the same memory."""
        flat = self.tensor.view(-1)[lo:hi]
        host = None if self.host is None else self.host.view(-1)[lo:hi]
        return HostBuffer(flat, self.mode, _host=host)

    def stage(self) -> None:
        """Before an MPI call reads or writes `message`: start the copy to the host ('stage'), or
        mark where the kernels writing the tensor end ('device')."""
        if self.mode == "view":
            return
        if self.mode == "stage":
            self.host.copy_(self.tensor, non_blocking=True)
        if self.tensor.device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(self.tensor.device))

    def ready(self) -> bool:
        """Whether `message` holds the tensor's values (what `stage()` started has finished)."""
        return self._event is None or self._event.query()

    def wait_ready(self) -> None:
        """Block until `ready()`."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None

    def scale_(self, factor: float) -> None:
        """Multiply the tensor by float32 `factor`, in place, where it lives (on the CPU through the
        numpy view: a tenth of torch's per-call cost on a small bucket)."""
        if self.mode == "view":
            self.message *= np.float32(factor)
        else:
            self.tensor.mul_(float(np.float32(factor)))

    def unstage(self) -> None:
        """After an MPI call wrote `message`: queue its copy back into the tensor ('stage'; the
        copy is ordered before the stream's next work, so the caller need not wait)."""
        if self.mode == "stage":
            self.tensor.copy_(self.host, non_blocking=True)
