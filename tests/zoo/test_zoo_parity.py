"""Model-zoo parity: published architectures (tests/zoo/nets.py) in real Caffe and the built-in engine.

Each case builds one architecture in both backends from the same prototxt text. Caffe fills the
weights with the architecture's fillers (gaussian, xavier, msra); Scale layers get random gammas
and betas; the engine gets a copy of every parameter blob (so the layouts must agree); both see
the same random input.

- TEST forward: every blob's data. BatchNorm's stored statistics are calibrated first: Caffe
  runs the net layer by layer and, before each BatchNorm, its statistics are set to the mean and
  variance of that layer's actual input, perturbed (mean by 0.2 standard deviations, variance
  by a factor 0.7-1.4, and a random moving-average scale factor), so the stored statistics are
  used in full and the activations stay at a realistic scale through a deep net.
- TRAIN forward + backward (force_backward, SoftmaxWithLoss against a random label, no Dropout
  layers, BatchNorm on batch statistics with random nonzero initial statistics): every blob's
  data, BatchNorm's statistics blobs (and every other parameter blob) after the forward, every
  blob's diff and every parameter diff after the backward.

The blobs compared are all of the engine's, which must be exactly Caffe's blobs less the Split
tops Caffe inserts (Caffe sums a split blob's diffs into the blob itself, which is compared).

Tolerance. The error of a blob is max|engine - Caffe| / max|Caffe| over the blob: relative to
the blob's largest magnitude, because float32 sums accumulated in a different order (Caffe's
im2col + gemm against oneDNN/BLAS in the engine) differ by a few ulps of the largest terms, not
of each element. Parameter diffs use the largest diff of their layer as the scale: a Scale beta
that feeds a train-mode BatchNorm (MobileNet v2's linear bottlenecks) has a gradient that is zero
in exact arithmetic, leaving only rounding noise of ~1e-7 of the gamma's gradient.

The bound is per architecture (TOLERANCE) because the error grows with depth. Nets without
BatchNorm stay within a few 1e-6. BatchNorm amplifies it: each layer divides by its channels'
standard deviation (a small-variance channel scales up its rounding error), and random-weight
BN-ReLU nets amplify perturbations layer after layer (Yang et al., "A Mean Field Theory of Batch
Normalization", 2019). Real Caffe shows the same growth against itself: perturbing its input by
one float32 ulp moves ResNet-50's last blobs by 1.4e-3 of their magnitude at 64x64, as much as
the engine's difference there. BatchNorm nets run at 128x128, where the last stage (4x4, batch 2)
normalizes 32 values per channel; smaller stages degenerate (at 2x2, Inception-BN's 3x3/1 pooling
makes every position of a channel equal, so its batch variance comes from two values). Each bound
is the next 1-2-5 step above 3x the worst error seen over four input seeds; the run prints the
worst error of every case (see conftest.py). Bugs of a few percent in one layer type (BatchNorm's
statistics or eps, a ReLU gradient leaking 1%) fail even ResNet-152's bound.

Kinks. ReLU, Clip and MAX pooling make a decision per element, and the backward follows it. Where
an input sits within rounding error of the kink (a pre-activation of 1e-9 in Caffe and -1e-9 in
the engine, two near-equal maxima in a window), the two backends may decide differently, and the
diff at that element differs by its whole value and spreads upstream. Deep nets have a few such
elements in every run. Before the backward, each decision that differs is aligned: Caffe's data
at that element is set to the engine's (for a pooling window, its chosen element is raised by one
ulp above Caffe's maximum, and the pooling forward is rerun so that Caffe's mask follows). Only
elements whose values already agree within the tolerance are aligned (checked), so both backward
passes differentiate the same function at points the forward comparison could not tell apart.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mpicaffe import prototxt
from mpicaffe.backends.engine.net import Net
from mpicaffe.proto import caffe_pb2
from tests.parity.common import caffe_net, copy_params, engine_net, pycaffe
from tests.zoo.nets import FULL_SIZE, NAMES, zoo_net

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST
f32 = np.float32

# worst error allowed (relative to each blob's max magnitude, see the module docstring)
TOLERANCE: dict[str, float] = {
    "caffenet": 2e-5, "alexnet": 2e-5, "vgg16": 2e-5, "nin": 2e-5, "googlenet": 2e-5,
    "squeezenet1_0": 2e-5, "squeezenet1_1": 2e-5, "preact_resnet18": 5e-5,
    "densenet121": 5e-4, "mobilenet_v1": 5e-4, "mobilenet_v2": 5e-4, "inception_bn": 1e-3,
    "resnet50": 1e-3, "resnet101": 5e-3, "resnet152": 2e-2,
    "fcn8s": 2e-5,  # tests/zoo/test_fcn.py
}

# small runs: (size, batch) per architecture; BatchNorm nets at 128 so that their last stage
# (4x4) normalizes 32 values per channel
SMALL: dict[str, tuple[int, int]] = {
    "caffenet": (99, 2), "alexnet": (99, 2), "vgg16": (64, 2), "nin": (99, 2), "googlenet": (96, 2),
    "squeezenet1_0": (99, 2), "squeezenet1_1": (99, 2),
    "preact_resnet18": (128, 2), "densenet121": (128, 2), "mobilenet_v1": (128, 2), "mobilenet_v2": (128, 2),
    "inception_bn": (128, 2), "resnet50": (128, 2), "resnet101": (128, 2), "resnet152": (128, 2),
}
# full size (batch 1): a TEST forward of every architecture, and a TRAIN pass of one per family
# (VGG-16's would take 20 s; its small TRAIN run stands for it)
FULL_TRAIN: list[str] = ["caffenet", "nin", "googlenet", "inception_bn", "resnet50", "preact_resnet18",
                         "densenet121", "mobilenet_v2", "squeezenet1_1"]

# worst error per case id, printed by conftest.py at the end of the run
WORST: dict[str, tuple[float, str, float]] = {}


@dataclass(frozen=True)
class ZooCase:
    net: str
    phase: int
    size: int
    batch: int

    @property
    def id(self) -> str:
        return f"{self.net}-{'train' if self.phase == TRAIN else 'test'}-{self.size}px-b{self.batch}"


TEST_CASES = [ZooCase(n, TEST, *SMALL[n]) for n in NAMES] + [ZooCase(n, TEST, FULL_SIZE[n], 1) for n in NAMES]
TRAIN_CASES = [ZooCase(n, TRAIN, *SMALL[n]) for n in NAMES] + [ZooCase(n, TRAIN, FULL_SIZE[n], 1) for n in FULL_TRAIN]


class Errors:
    """Collects max|engine - Caffe| / scale for each compared array and fails with the worst."""

    def __init__(self, case: ZooCase):
        self.case = case
        self.tol = TOLERANCE[case.net]
        self.errors: list[tuple[float, str]] = []
        self.aligned: dict[str, int] = {}  # kink decisions aligned before the backward, per layer type

    def add(self, what: str, engine: np.ndarray, caffe: np.ndarray, scale: float | None = None) -> None:
        e, c = np.asarray(engine, np.float64), np.asarray(caffe, np.float64)
        assert e.shape == c.shape, f"{what}: shape {e.shape} (engine) vs {c.shape} (Caffe)"
        if not c.size:
            return
        scale = float(np.abs(c).max()) if scale is None else scale
        diff = float(np.abs(e - c).max())
        # an all-zero reference must be matched exactly
        self.errors.append((diff / scale if scale > 0 else (0.0 if diff == 0 else np.inf), what))

    def check(self) -> None:
        worst = max(self.errors)
        aligned = ", ".join(f"{n} {t}" for t, n in self.aligned.items() if n)
        WORST[self.case.id] = (worst[0], worst[1] + (f" ({aligned} decisions aligned)" if aligned else ""), self.tol)
        bad = sorted((e for e in self.errors if not e[0] <= self.tol), reverse=True)
        assert not bad, (f"{self.case.id}: {len(bad)} of {len(self.errors)} arrays differ by more than "
                         f"{self.tol:g} of their max magnitude; worst: "
                         + ", ".join(f"{what} {err:.2e}" for err, what in bad[:8]))


# --- building both nets ---
def _layer_params(text: str) -> dict[str, caffe_pb2.LayerParameter]:
    return {lp.name: lp for lp in prototxt.parse_text(text, caffe_pb2.NetParameter()).layer}


def _caffe_layers(cnet):
    """(name, type, bottom names, top names) of each of Caffe's layers, in order."""
    return [(name, layer.type, list(cnet.bottom_names[name]), list(cnet.top_names[name]))
            for name, layer in zip(cnet._layer_names, cnet.layers)]


def _randomize_scales(cnet, rng: np.random.Generator) -> None:
    """Scale layers: gammas in [0.5, 1.5], betas ~ N(0, 0.2) instead of Caffe's default 1 and 0."""
    for name, type, _, _ in _caffe_layers(cnet):
        if type == "Scale":
            gamma, beta = cnet.params[name]
            gamma.data[...] = rng.uniform(0.5, 1.5, gamma.data.shape)
            beta.data[...] = rng.normal(0, 0.2, beta.data.shape)


def _set_stats(blobs, mean: np.ndarray, var: np.ndarray, rng: np.random.Generator) -> None:
    # Caffe stores sums scaled by a moving-average factor and divides by it: a random factor
    # checks that the engine divides too
    factor = rng.uniform(0.5, 2.0)
    blobs[0].data[...] = mean * factor
    blobs[1].data[...] = var * factor
    blobs[2].data[...] = factor


def _calibrate_batchnorm(cnet, rng: np.random.Generator) -> None:
    """Run Caffe's net layer by layer, giving each BatchNorm statistics near those of its input."""
    for name, type, bottoms, _ in _caffe_layers(cnet):
        if type == "BatchNorm":
            x = cnet.blobs[bottoms[0]].data
            axes = (0, *range(2, x.ndim))
            mean, var = x.mean(axes), x.var(axes)
            _set_stats(cnet.params[name], mean + rng.normal(0, 0.2, mean.shape) * np.sqrt(var),
                       var * rng.uniform(0.7, 1.4, var.shape), rng)
        cnet.forward(start=name, end=name)


def _random_batchnorm_stats(cnet, rng: np.random.Generator) -> None:
    """Nonzero initial statistics, so the TRAIN update (sum = fraction * sum + batch statistic) shows."""
    for name, type, _, _ in _caffe_layers(cnet):
        if type == "BatchNorm":
            shape = cnet.params[name][0].data.shape
            _set_stats(cnet.params[name], rng.normal(0, 1, shape), rng.uniform(0.5, 2, shape), rng)


def _build(case: ZooCase, tmp_path) -> tuple[Any, Net, dict[str, caffe_pb2.LayerParameter]]:
    """Caffe's net (pycaffe), the engine's, and the layer parameters by name, for a case: the
    same weights and inputs in both, BatchNorm statistics set as the phase wants."""
    caffe = pycaffe()
    seed = zlib.crc32(case.id.encode())
    caffe.set_random_seed(seed % 2**31)
    rng = np.random.default_rng(seed)
    train = case.phase == TRAIN
    text = zoo_net(case.net, case.batch, case.size, train=train, dropout=not train)
    if train:
        text = "force_backward: true\n" + text
    cnet = caffe_net(text, case.phase, tmp_path / f"{case.net}.prototxt")
    inputs = {"data": rng.standard_normal(cnet.blobs["data"].data.shape).astype(f32)}
    if train:
        inputs["label"] = rng.integers(0, 1000, case.batch).astype(f32)
    for name, a in inputs.items():
        cnet.blobs[name].data[...] = a
    _randomize_scales(cnet, rng)
    if train:
        _random_batchnorm_stats(cnet, rng)
    else:
        _calibrate_batchnorm(cnet, rng)
    enet = engine_net(text, case.phase, f"<zoo {case.id}>")
    copy_params(cnet, enet)
    for name, a in inputs.items():
        enet.blobs[name].data[...] = a
    return cnet, enet, _layer_params(text)


def _compared_blobs(cnet, enet) -> list[str]:
    splits = {t for _, type, _, tops in _caffe_layers(cnet) if type == "Split" for t in tops}
    assert set(enet.blobs) == set(cnet.blobs) - splits, "blob names differ: " + ", ".join(
        sorted(set(enet.blobs) ^ (set(cnet.blobs) - splits)))
    return list(enet.blobs)


def _compare_params(errors: Errors, cnet, enet, diff: bool) -> None:
    engine_params = enet.params  # built afresh on each access
    for name, blobs in cnet.params.items():
        # diffs on the scale of the layer's largest (see the module docstring); data per blob
        scale = max(float(np.abs(b.diff).max()) for b in blobs) if diff else None
        for j, b in enumerate(blobs):
            e = engine_params[name][j]
            errors.add(f"{name}[{j}] {'diff' if diff else 'data'}", e.diff if diff else e.data,
                       b.diff if diff else b.data, scale)


# --- aligning kink decisions before the backward ---
def _pool_argmax(x: np.ndarray, p: caffe_pb2.PoolingParameter, out_shape: tuple[int, ...]) -> np.ndarray:
    """Flat index of the first maximum of each MAX pooling window (Caffe's mask rule)."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    kernel = tuple(t.shape[2:]) if p.global_pooling else p.kernel_size
    _, idx = F.max_pool2d(t, kernel, p.stride, p.pad, ceil_mode=True, return_indices=True)
    # torch's ceil-mode windows are Caffe's for every pooling in the zoo; a shape change would say otherwise
    assert tuple(idx.shape) == out_shape, f"pooling windows: torch {tuple(idx.shape)} vs Caffe {out_shape}"
    return idx.numpy()


def _align_kinks(cnet, enet: Net, layers: dict[str, caffe_pb2.LayerParameter], tol: float) -> dict[str, int]:
    """Make Caffe's backward take the engine's ReLU, Clip and MAX pooling decisions; returns how
    many decisions differed, per layer type. Each aligned element must already agree within
    `tol` of its blob's max magnitude (else the forward comparison failed first)."""
    counts = {"ReLU": 0, "Clip": 0, "Pooling": 0}

    def checked(where: str, c: np.ndarray, e: np.ndarray, mask: np.ndarray) -> None:
        scale = max(float(np.abs(c).max()), np.finfo(f32).tiny)
        worst = float(np.abs(c[mask] - e[mask]).max())
        assert worst <= tol * scale, f"{where}: a decision differs where the values differ by {worst / scale:.2e}"

    # blob names as the prototxt gives them: where Caffe reads a Split top instead, it shares the data
    for name, type, _, _ in _caffe_layers(cnet):
        lp = layers.get(name)  # None for the Split layers Caffe inserts
        if type == "ReLU":
            # Caffe's ReLU backward tests its top data (in place: the rectified values) > 0
            c, e = cnet.blobs[lp.top[0]].data, enet.blobs[lp.top[0]].data
            flip = (c > 0) != (e > 0)
        elif type == "Clip":
            # its backward tests its bottom data (min <= x <= max): Clip runs out of place here
            p = lp.clip_param
            c, e = cnet.blobs[lp.bottom[0]].data, enet.blobs[lp.bottom[0]].data
            flip = ((c >= p.min) & (c <= p.max)) != ((e >= p.min) & (e <= p.max))
        elif type == "Pooling" and lp.pooling_param.pool == caffe_pb2.PoolingParameter.MAX:
            counts["Pooling"] += _align_max_pooling(cnet, enet, lp, tol)
            continue
        else:
            continue
        if flip.any():
            checked(name, c, e, flip)
            c[flip] = e[flip]
            counts[type] += int(flip.sum())
    return counts


def _align_max_pooling(cnet, enet: Net, lp: caffe_pb2.LayerParameter, tol: float) -> int:
    name = lp.name
    c, e = cnet.blobs[lp.bottom[0]].data, enet.blobs[lp.bottom[0]].data
    out_shape = cnet.blobs[lp.top[0]].data.shape
    want = _pool_argmax(e, lp.pooling_param, out_shape)
    scale = max(float(np.abs(c).max()), np.finfo(f32).tiny)
    flat = c.reshape(*c.shape[:2], -1)
    aligned = 0
    # Caffe's backward follows the mask its forward stored: recompute it first, since aligning a
    # ReLU upstream may have changed this layer's input since the forward
    cnet.forward(start=name, end=name)
    # windows overlap: raising one element can move another window's maximum, so repeat
    for _ in range(4):
        have = _pool_argmax(c, lp.pooling_param, out_shape)
        flip = have != want
        if not flip.any():
            return aligned
        for n, ch, i, j in zip(*np.nonzero(flip)[:2], have[flip], want[flip]):
            gap = float(flat[n, ch, i] - flat[n, ch, j])
            assert gap <= 2 * tol * scale, f"{name}: a window's maximum differs by {gap / scale:.2e}"
            flat[n, ch, j] = np.nextafter(flat[n, ch, i], f32(np.inf))
        aligned += int(flip.sum())
        cnet.forward(start=name, end=name)  # recomputes Caffe's mask from the aligned data
    raise AssertionError(f"{name}: could not align Caffe's max pooling choices with the engine's")


# --- the tests ---
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in TEST_CASES])
def test_test_phase_forward_matches_caffe(case: ZooCase, tmp_path):
    cnet, enet, _ = _build(case, tmp_path)
    errors = Errors(case)
    cnet.forward()
    enet.forward()
    for blob in _compared_blobs(cnet, enet):
        errors.add(f"blob '{blob}' data", enet.blobs[blob].data, cnet.blobs[blob].data)
    errors.check()


def forward_backward(errors: Errors, cnet, enet: Net, layers: dict[str, caffe_pb2.LayerParameter]) -> None:
    """A TRAIN forward and backward in both nets: every blob's data and every parameter after the
    forward (checked), every blob's diff after the backward (added to `errors`, not yet checked:
    the parameter diffs are the caller's)."""
    cnet.forward()
    enet.forward()
    blobs = _compared_blobs(cnet, enet)
    for blob in blobs:
        errors.add(f"blob '{blob}' data", enet.blobs[blob].data, cnet.blobs[blob].data)
    _compare_params(errors, cnet, enet, diff=False)  # BatchNorm statistics after the forward
    errors.check()  # the forward first: aligning kinks needs forward values that agree
    errors.aligned = _align_kinks(cnet, enet, layers, errors.tol)
    cnet.clear_param_diffs()
    enet.clear_param_diffs()
    cnet.backward()
    enet.backward()
    for blob in blobs:
        errors.add(f"blob '{blob}' diff", enet.blobs[blob].diff, cnet.blobs[blob].diff)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in TRAIN_CASES])
def test_train_phase_forward_backward_matches_caffe(case: ZooCase, tmp_path):
    cnet, enet, layers = _build(case, tmp_path)
    errors = Errors(case)
    forward_backward(errors, cnet, enet, layers)
    _compare_params(errors, cnet, enet, diff=True)
    errors.check()
