"""Atomic file writes: a crash or kill never leaves a half-written file under the final name."""
from __future__ import annotations

import os
import uuid
from collections.abc import Callable


def write_file_atomic(path: str, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` on a temporary file beside `path`, fsync it, rename it over `path`,
    and fsync the folder so the rename itself survives a crash. Permissions follow the umask.
    For writers that need a file name (h5py); bytes go through write_bytes_atomic."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # created with mode 0666, which the kernel reduces by the umask (mkstemp's 0600 would need a
    # chmod, and reading the umask means setting it: process-wide, racing other threads' files)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.partial")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write `data` to `path` atomically (see write_file_atomic)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    write_file_atomic(path, write)
