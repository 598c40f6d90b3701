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
