"""Shared helpers of the parity tests: the same net in real Caffe (pycaffe) and the built-in engine."""
from __future__ import annotations

import numpy as np

from mpicaffe import prototxt
from mpicaffe.backends.engine.net import Net
from mpicaffe.proto import caffe_pb2
from tests.real_caffe import import_pycaffe

# float32 parity: relative 1e-5 plus an absolute 1e-6 scaled by the reference's magnitude, which
# allows for float32 sums accumulated in a different order (BLAS/oneDNN vs Caffe's im2col+gemm)
RTOL = 1e-5
ATOL = 1e-6


def pycaffe():
    """pycaffe in CPU mode (skip outside CI, fail in CI when missing)."""
    caffe = import_pycaffe()
    caffe.set_mode_cpu()
    return caffe


def assert_close(actual, expected, what: str, rtol: float = RTOL, atol: float = ATOL) -> None:
    """assert_allclose with atol scaled by max(1, max|expected|), naming what is compared."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} (engine) vs {expected.shape} (Caffe)"
    scale = max(1.0, float(np.abs(expected).max())) if expected.size else 1.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale,
                               err_msg=f"{what}: engine (actual) vs Caffe (desired)")


def write_text(path, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def caffe_net(text: str, phase: int, path, weights: str | None = None):
    """A pycaffe Net from prototxt text (written to `path`), optionally loading weights."""
    caffe = pycaffe()
    write_text(path, text)
    if weights:
        return caffe.Net(str(path), caffe.TRAIN if phase == caffe_pb2.TRAIN else caffe.TEST, weights=weights)
    return caffe.Net(str(path), caffe.TRAIN if phase == caffe_pb2.TRAIN else caffe.TEST)


def engine_net(text: str, phase: int, source: str = "<parity>") -> Net:
    """The engine's Net from the same prototxt text, filtered for `phase`."""
    param = prototxt.parse_text(text, caffe_pb2.NetParameter(), source)
    param = prototxt.upgrade_net_as_needed(param, source)
    return Net(prototxt.net_for_phase(param, phase, source=source), "cpu", source)


def param_shapes(net) -> dict[str, list[tuple[int, ...]]]:
    return {name: [tuple(b.data.shape) for b in blobs] for name, blobs in net.params.items()}


def copy_params(src, dst) -> None:
    """Copy every parameter blob of `src` into `dst` (pycaffe-style nets), checking the layout."""
    assert param_shapes(dst) == param_shapes(src), "parameter blob layouts differ"
    dst_params = dst.params  # built afresh on each access by both pycaffe and the engine
    for name, blobs in src.params.items():
        for j, b in enumerate(blobs):
            dst_params[name][j].data[...] = b.data


def compare_params(engine, caffe, what: str, diff: bool = False, **tol) -> None:
    """Every parameter blob's data (or diff) of the two nets."""
    assert param_shapes(engine) == param_shapes(caffe), f"{what}: parameter blob layouts differ"
    engine_params = engine.params  # built afresh on each access
    for name, blobs in caffe.params.items():
        for j, b in enumerate(blobs):
            e = engine_params[name][j]
            assert_close(e.diff if diff else e.data, b.diff if diff else b.data,
                         f"{what}: {name}[{j}] {'diff' if diff else 'data'}", **tol)
