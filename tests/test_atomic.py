"""Atomic writes: the final name holds either the old complete file or the new one."""
import os

import pytest

from mpicaffe.atomic import write_bytes_atomic


def test_writes_content_with_umask_permissions(tmp_path):
    path = tmp_path / "sub" / "f.bin"
    write_bytes_atomic(str(path), b"abc")
    assert path.read_bytes() == b"abc"
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_failed_write_keeps_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    write_bytes_atomic(str(path), b"old")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_bytes_atomic(str(path), b"new")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_the_process_umask_is_never_changed(tmp_path, monkeypatch):
    # another thread creating a file while the umask were 0 would get a world-writable one
    def no_umask(mask):
        raise AssertionError(f"os.umask({mask:o}) called")

    monkeypatch.setattr(os, "umask", no_umask)
    write_bytes_atomic(str(tmp_path / "f.bin"), b"data")
    assert (tmp_path / "f.bin").read_bytes() == b"data"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".partial")]
