"""Layer parity: real Caffe (pycaffe) and the built-in engine on the same one-layer nets.

Each case is an Input layer feeding the layer under test (or the layer's own data source). Both
nets get the same random inputs; the engine gets the parameter blobs Caffe filled (so the blob
layouts must agree). We compare every top after forward, every parameter blob after forward
(BatchNorm's statistics), and, after a backward with random top diffs on non-loss tops
(force_backward: true where Caffe allows it), every bottom diff and parameter diff.

Tolerance: float32, |engine - caffe| <= 1e-5 * |caffe| + 1e-6 * max(1, max|caffe|) elementwise
(tests/parity/common.py). Both run in float32 and may sum in different orders (oneDNN/BLAS vs
Caffe's im2col + gemm), which costs a few ulps of the largest value, well inside this bound.

Covered types: every key of CASES plus SPECIAL (tested by their own functions below).
test_every_common_type_has_a_case fails when a type both backends know has no case.
Random layers: Dropout is compared in TEST phase and, in TRAIN, each backend is checked against
Caffe's formula with its own mask (the masks come from different RNGs). DummyData uses constant
fillers only, for the same reason.
"""
from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import h5py
import numpy as np
import pytest

from mpicaffe import prototxt
from mpicaffe.backends.engine.layers import layer_types
from mpicaffe.data import lmdb_io
from mpicaffe.proto import caffe_pb2
from tests.parity.common import assert_close, caffe_net, compare_params, copy_params, engine_net, pycaffe

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST
f32 = np.float32

Gen = Callable[[np.random.Generator], np.ndarray]


# --- input generators ---
def normal(*shape: int, scale: float = 1.0) -> Gen:
    return lambda r: (r.standard_normal(shape) * scale).astype(f32)


def uniform(lo: float, hi: float, *shape: int) -> Gen:
    return lambda r: r.uniform(lo, hi, shape).astype(f32)


def labels(shape: tuple[int, ...], k: int) -> Gen:
    return lambda r: r.integers(0, k, shape).astype(f32)


def binary(*shape: int, ignore: float | None = None) -> Gen:
    def gen(r):
        t = r.integers(0, 2, shape).astype(f32)
        if ignore is not None:
            t[r.random(shape) < 0.25] = ignore
        return t
    return gen


def probs(n: int, k: int) -> Gen:
    def gen(r):
        p = r.uniform(0.05, 1.0, (n, k))
        return (p / p.sum(1, keepdims=True)).astype(f32)
    return gen


def spread(*shape: int) -> Gen:
    """Values from -60 to 60, with the tails BNLL's threshold and saturations care about."""
    return lambda r: (r.standard_normal(shape) * 3 + r.choice([0, 0, 55, -55], shape)).astype(f32)


@dataclass
class Case:
    """One net: `inputs` (Input layer tops) -> layer "L" of `type` with prototxt `body`."""

    type: str
    name: str
    body: str
    inputs: dict[str, Gen] = field(default_factory=dict)
    phase: int = TRAIN
    backward: bool = True
    force_backward: bool = True
    seed_tops: tuple[str, ...] | None = None  # tops that get random diffs (default: every non-loss top)
    init_params: Callable[[np.random.Generator, int, tuple], np.ndarray] | None = None
    prepare: Callable[[object, np.random.Generator], None] | None = None  # writes files into tmp_path
    pre: str = ""  # layers between the Input layer and "L"
    post: str = ""  # layers after "L" (a loss, where Caffe cannot force backward)
    tol: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.type}-{self.name}"


CASES: list[Case] = []


def case(type: str, name: str, body: str, **kw) -> None:
    CASES.append(Case(type, name, body, **kw))


X4 = {"x": normal(2, 4, 7, 7)}
CONV_FILL = 'weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.5 }'

# --- vision ---
for name, p in [
    ("basic", "num_output: 6 kernel_size: 3"),
    ("stride2_pad1", "num_output: 6 kernel_size: 3 stride: 2 pad: 1"),
    ("group2", "num_output: 6 kernel_size: 3 group: 2"),
    ("depthwise", "num_output: 4 kernel_size: 3 group: 4 pad: 1"),
    ("dilation2", "num_output: 5 kernel_size: 3 dilation: 2 pad: 2"),
    ("rect", "num_output: 3 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0"),
    ("stride3_floor", "num_output: 3 kernel_size: 3 stride: 3"),
    ("1x1_no_bias", "num_output: 5 kernel_size: 1 bias_term: false"),
]:
    case("Convolution", name, f'bottom: "x" top: "y" convolution_param {{ {p} {CONV_FILL} }}', inputs=X4)
case("Convolution", "3d", f'bottom: "x" top: "y" convolution_param {{ num_output: 3 kernel_size: 2 pad: 1 {CONV_FILL} }}',
     inputs={"x": normal(2, 2, 3, 4, 4)})
case("Convolution", "axis2", f'bottom: "x" top: "y" convolution_param {{ num_output: 3 kernel_size: 3 axis: 2 '
     f'{CONV_FILL} }}', inputs={"x": normal(2, 3, 2, 5, 5)})
for name, p in [
    ("stride2_pad1", "num_output: 3 kernel_size: 3 stride: 2 pad: 1"),
    ("upsample_k4", "num_output: 3 kernel_size: 4 stride: 2 pad: 1"),
    ("group2", "num_output: 4 kernel_size: 3 stride: 2 group: 2"),
    ("dilation2", "num_output: 2 kernel_size: 3 dilation: 2"),
    ("rect_no_bias", "num_output: 2 kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 bias_term: false"),
]:
    case("Deconvolution", name, f'bottom: "x" top: "y" convolution_param {{ {p} {CONV_FILL} }}',
         inputs={"x": normal(2, 4, 4, 4)})
for name, p, x in [
    ("basic", "num_output: 5", normal(3, 4, 2, 2)),
    ("axis2", "num_output: 5 axis: 2", normal(2, 3, 4)),
    ("transpose", "num_output: 5 transpose: true", normal(3, 6)),
    ("no_bias", "num_output: 4 bias_term: false", normal(3, 6)),
]:
    case("InnerProduct", name, f'bottom: "x" top: "y" inner_product_param {{ {p} {CONV_FILL} }}', inputs={"x": x})
for name, p in [
    ("max_k2_s2_border", "pool: MAX kernel_size: 2 stride: 2"),
    ("max_k3_s2_pad1", "pool: MAX kernel_size: 3 stride: 2 pad: 1"),
    ("max_rect", "pool: MAX kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0"),
    ("max_floor", "pool: MAX kernel_size: 2 stride: 2 round_mode: FLOOR"),
    ("ave_k3_s2_pad1", "pool: AVE kernel_size: 3 stride: 2 pad: 1"),
    ("ave_k2_s2_border", "pool: AVE kernel_size: 2 stride: 2"),
    ("ave_k4_s3_pad2", "pool: AVE kernel_size: 4 stride: 3 pad: 2"),
    ("ave_k3_s1", "pool: AVE kernel_size: 3"),
    ("global_max", "pool: MAX global_pooling: true"),
    ("global_ave", "pool: AVE global_pooling: true"),
]:
    case("Pooling", name, f'bottom: "x" top: "y" pooling_param {{ {p} }}', inputs={"x": normal(2, 3, 7, 7)})
case("Pooling", "max_with_mask", 'bottom: "x" top: "y" top: "mask" pooling_param { pool: MAX kernel_size: 3 stride: 2 }',
     inputs={"x": normal(2, 3, 7, 7)}, seed_tops=("y",))
for name, p in [("max_h2", "pyramid_height: 2 pool: MAX"), ("ave_h3", "pyramid_height: 3 pool: AVE")]:
    case("SPP", name, f'bottom: "x" top: "y" spp_param {{ {p} }}', inputs={"x": normal(2, 3, 7, 7)})
for name, p in [
    ("across_5", "local_size: 5 alpha: 0.1 beta: 0.75 k: 2"),
    ("across_defaults", ""),
    ("within_3", "local_size: 3 alpha: 0.5 beta: 0.6 norm_region: WITHIN_CHANNEL"),
    ("within_k_ignored", "local_size: 5 alpha: 0.3 beta: 0.75 k: 3 norm_region: WITHIN_CHANNEL"),
]:
    case("LRN", name, f'bottom: "x" top: "y" lrn_param {{ {p} }}', inputs={"x": normal(2, 7, 5, 5, scale=2.0)})

# --- activations ---
X = {"x": normal(2, 3, 4, 5)}
for t, name, p in [
    ("ReLU", "basic", ""), ("ReLU", "leaky", "relu_param { negative_slope: 0.1 }"),
    ("ELU", "default", ""), ("ELU", "alpha", "elu_param { alpha: 0.5 }"),
    ("Sigmoid", "basic", ""), ("TanH", "basic", ""), ("AbsVal", "basic", ""),
    ("Power", "identity", ""), ("Power", "square", "power_param { power: 2 scale: 0.5 shift: 1 }"),
    ("Power", "cube", "power_param { power: 3 scale: -1 shift: 0.2 }"),
    ("Power", "power0", "power_param { power: 0 scale: 2 }"), ("Power", "scale0", "power_param { power: 2 scale: 0 }"),
    ("Exp", "default", ""), ("Exp", "base2", "exp_param { base: 2 scale: 0.5 shift: 1 }"),
    ("Clip", "basic", "clip_param { min: -0.5 max: 0.7 }"),
    ("Swish", "default", ""), ("Swish", "beta", "swish_param { beta: 1.5 }"),
    ("Dropout", "test_identity", "dropout_param { dropout_ratio: 0.3 }"),
]:
    case(t, name, f'bottom: "x" top: "y" {p}', inputs=X, phase=TEST if t == "Dropout" else TRAIN)
case("BNLL", "tails", 'bottom: "x" top: "y"', inputs={"x": spread(3, 40)})
case("Sigmoid", "tails", 'bottom: "x" top: "y"', inputs={"x": spread(3, 40)})
case("Power", "sqrt", 'bottom: "x" top: "y" power_param { power: 0.5 scale: 2 shift: 0.1 }',
     inputs={"x": uniform(0.1, 3, 2, 3, 4)})
case("Log", "default", 'bottom: "x" top: "y"', inputs={"x": uniform(0.1, 3, 2, 3, 4)})
case("Log", "base10", 'bottom: "x" top: "y" log_param { base: 10 scale: 2 shift: 0.5 }',
     inputs={"x": uniform(0.1, 3, 2, 3, 4)})
for name, p in [("zero", ""), ("point3", "threshold_param { threshold: 0.3 }")]:
    case("Threshold", name, f'bottom: "x" top: "y" {p}', inputs=X, backward=False, force_backward=False)
for name, p in [
    ("channelwise", ""),
    ("shared_gaussian", 'prelu_param { channel_shared: true filler { type: "gaussian" std: 0.5 } }'),
    ("channelwise_gaussian", 'prelu_param { filler { type: "gaussian" std: 0.5 } }'),
]:
    case("PReLU", name, f'bottom: "x" top: "y" {p}', inputs=X)
case("PReLU", "2d", 'bottom: "x" top: "y" prelu_param { filler { type: "gaussian" std: 0.5 } }',
     inputs={"x": normal(4, 3)})


# --- normalization ---
def bn_stats(r: np.random.Generator, j: int, shape: tuple) -> np.ndarray:
    if j == 0:
        return r.standard_normal(shape).astype(f32)
    if j == 1:
        return r.uniform(0.5, 2.0, shape).astype(f32)
    return np.full(shape, r.uniform(0.5, 2.0), f32)


BN = {"x": normal(4, 3, 2, 2, scale=2.0)}
case("BatchNorm", "train", 'bottom: "x" top: "y"', inputs=BN)
case("BatchNorm", "train_fraction_eps", 'bottom: "x" top: "y" batch_norm_param { moving_average_fraction: 0.9 eps: 0.001 }',
     inputs=BN, init_params=bn_stats)
case("BatchNorm", "train_2d", 'bottom: "x" top: "y"', inputs={"x": normal(6, 3)})
case("BatchNorm", "test_global_stats", 'bottom: "x" top: "y"', inputs=BN, phase=TEST, init_params=bn_stats)
case("BatchNorm", "train_use_global_stats", 'bottom: "x" top: "y" batch_norm_param { use_global_stats: true }',
     inputs=BN, init_params=bn_stats)
case("BatchNorm", "test_batch_stats", 'bottom: "x" top: "y" batch_norm_param { use_global_stats: false }',
     inputs=BN, phase=TEST, init_params=bn_stats)
SC_FILL = 'filler { type: "gaussian" std: 1 } bias_filler { type: "gaussian" std: 1 }'
case("Scale", "learned_bias", f'bottom: "x" top: "y" scale_param {{ bias_term: true {SC_FILL} }}', inputs=X)
case("Scale", "learned_all_axes", f'bottom: "x" top: "y" scale_param {{ axis: 1 num_axes: -1 {SC_FILL} }}', inputs=X)
case("Scale", "learned_scalar", f'bottom: "x" top: "y" scale_param {{ num_axes: 0 {SC_FILL} }}', inputs=X)
case("Scale", "bottom_axis0", 'bottom: "x" bottom: "s" top: "y" scale_param { axis: 0 }',
     inputs={"x": normal(2, 3, 4, 5), "s": normal(2, 3)})
case("Scale", "bottom_axis2_bias", f'bottom: "x" bottom: "s" top: "y" scale_param {{ axis: 2 bias_term: true {SC_FILL} }}',
     inputs={"x": normal(2, 3, 4, 5), "s": normal(4, 5)})
case("Bias", "learned", 'bottom: "x" top: "y" bias_param { filler { type: "gaussian" std: 1 } }', inputs=X)
case("Bias", "bottom_axis1", 'bottom: "x" bottom: "b" top: "y"', inputs={"x": normal(2, 3, 4, 5), "b": normal(3, 4)})
for name, p in [("default", ""), ("mean_only", "mvn_param { normalize_variance: false }"),
                ("across_channels", "mvn_param { across_channels: true eps: 0.01 }")]:
    case("MVN", name, f'bottom: "x" top: "y" {p}', inputs={"x": normal(2, 3, 4, 5, scale=3.0)})

# --- structure ---
E3 = {"a": normal(2, 3, 4), "b": normal(2, 3, 4), "c": normal(2, 3, 4)}
for name, p in [("sum", "operation: SUM"), ("sum_coeff", "operation: SUM coeff: 1 coeff: -0.5 coeff: 2"),
                ("prod", "operation: PROD"), ("prod_unstable", "operation: PROD stable_prod_grad: false"),
                ("max", "operation: MAX")]:
    case("Eltwise", name, f'bottom: "a" bottom: "b" bottom: "c" top: "y" eltwise_param {{ {p} }}', inputs=E3)
case("Concat", "axis1", 'bottom: "a" bottom: "b" top: "y"', inputs={"a": normal(2, 3, 4), "b": normal(2, 2, 4)})
case("Concat", "axis0", 'bottom: "a" bottom: "b" top: "y" concat_param { axis: 0 }',
     inputs={"a": normal(2, 3, 4), "b": normal(1, 3, 4)})
case("Concat", "axis_neg1", 'bottom: "a" bottom: "b" top: "y" concat_param { axis: -1 }',
     inputs={"a": normal(2, 3, 4), "b": normal(2, 3, 1)})
case("Slice", "points", 'bottom: "x" top: "a" top: "b" top: "c" slice_param { axis: 1 slice_point: 1 slice_point: 3 }',
     inputs={"x": normal(2, 5, 3)})
case("Slice", "even_axis0", 'bottom: "x" top: "a" top: "b" slice_param { axis: 0 }', inputs={"x": normal(4, 3)})
case("Split", "two", 'bottom: "x" top: "a" top: "b"', inputs={"x": normal(2, 3)})
for name, p in [("default", ""), ("axis2", "flatten_param { axis: 2 }"),
                ("end_axis", "flatten_param { axis: 1 end_axis: -2 }")]:
    case("Flatten", name, f'bottom: "x" top: "y" {p}', inputs={"x": normal(2, 3, 4, 5)})
for name, p in [("copy_infer", "shape { dim: 0 dim: -1 }"),
                ("axis_num_axes", "shape { dim: -1 } axis: 1 num_axes: 2"),
                ("insert_axis", "shape { dim: 1 } axis: 1 num_axes: 0")]:
    case("Reshape", name, f'bottom: "x" top: "y" reshape_param {{ {p} }}', inputs={"x": normal(2, 3, 4, 5)})
case("Crop", "axis2", 'bottom: "a" bottom: "b" top: "y" crop_param { axis: 2 offset: 1 offset: 2 }',
     inputs={"a": normal(2, 3, 8, 8), "b": normal(2, 3, 5, 4)})
case("Crop", "axis1_one_offset", 'bottom: "a" bottom: "b" top: "y" crop_param { axis: 1 offset: 1 }',
     inputs={"a": normal(2, 3, 6, 6), "b": normal(2, 2, 4, 5)})
case("Tile", "axis1", 'bottom: "x" top: "y" tile_param { axis: 1 tiles: 3 }', inputs={"x": normal(2, 3, 4)})
case("Tile", "last", 'bottom: "x" top: "y" tile_param { axis: -1 tiles: 2 }', inputs={"x": normal(2, 3, 4)})
for name, p in [("sum_all_coeff", "operation: SUM axis: 0 coeff: 2"), ("asum_axis1", "operation: ASUM axis: 1"),
                ("sumsq_axis2", "operation: SUMSQ axis: 2"), ("mean_coeff", "operation: MEAN axis: 1 coeff: -0.5"),
                ("default", "")]:
    case("Reduction", name, f'bottom: "x" top: "y" reduction_param {{ {p} }}', inputs={"x": normal(2, 3, 4)})
for name, p, x in [("top1", "", normal(3, 10)), ("top3_values", "top_k: 3 out_max_val: true", normal(3, 10)),
                   ("axis1_top2", "axis: 1 top_k: 2", normal(2, 5, 3)),
                   ("axis1_values", "axis: 1 out_max_val: true", normal(2, 5, 3))]:
    case("ArgMax", name, f'bottom: "x" top: "y" argmax_param {{ {p} }}', inputs={"x": x}, backward=False,
         force_backward=False)
case("Silence", "two", 'bottom: "a" bottom: "b"', inputs={"a": normal(2, 3), "b": normal(4)})
# Caffe's Embed and BatchReindex abort on a forced backward to their index bottoms, and without
# force_backward Caffe skips layers that feed no loss: so these feed a EuclideanLoss
TO_LOSS = 'layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }'
case("Embed", "bias", 'bottom: "i" top: "y" embed_param { input_dim: 10 num_output: 5 '
     'weight_filler { type: "gaussian" std: 1 } bias_filler { type: "gaussian" std: 1 } }',
     inputs={"i": labels((4, 3), 10), "t": normal(4, 3, 5)}, force_backward=False, post=TO_LOSS)
case("Embed", "no_bias", 'bottom: "i" top: "y" embed_param { input_dim: 4 num_output: 3 bias_term: false '
     'weight_filler { type: "gaussian" std: 1 } }', inputs={"i": labels((7,), 4), "t": normal(7, 3)},
     force_backward=False, post=TO_LOSS)
case("BatchReindex", "gather", 'bottom: "x" bottom: "idx" top: "y"',
     inputs={"idx": labels((5,), 4), "t": normal(5, 3, 2)}, force_backward=False, post=TO_LOSS,
     pre='layer { name: "x" type: "Parameter" top: "x" parameter_param { shape { dim: 4 dim: 3 dim: 2 } } }',
     init_params=lambda r, j, shape: r.standard_normal(shape).astype(f32))
case("Parameter", "hand_diff", 'top: "y" parameter_param { shape { dim: 2 dim: 3 } }',
     init_params=lambda r, j, shape: r.standard_normal(shape).astype(f32))
case("Parameter", "to_loss", 'top: "y" parameter_param { shape { dim: 2 dim: 3 } }', inputs={"t": normal(2, 3)},
     init_params=lambda r, j, shape: r.standard_normal(shape).astype(f32), post=TO_LOSS, force_backward=False)
case("Parameter", "to_loss_forced", 'top: "y" parameter_param { shape { dim: 2 dim: 3 } }', inputs={"t": normal(2, 3)},
     init_params=lambda r, j, shape: r.standard_normal(shape).astype(f32), post=TO_LOSS)
for name, p in [("k3_s2_pad1", "kernel_size: 3 stride: 2 pad: 1"), ("dilation2", "kernel_size: 2 dilation: 2"),
                ("rect", "kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2")]:
    case("Im2col", name, f'bottom: "x" top: "y" convolution_param {{ {p} }}', inputs={"x": normal(2, 3, 6, 6)})
case("Softmax", "axis1", 'bottom: "x" top: "y"', inputs={"x": normal(2, 5, 3, scale=3)})
case("Softmax", "axis_neg1", 'bottom: "x" top: "y" softmax_param { axis: -1 }', inputs={"x": normal(3, 4, 6, scale=3)})

# --- recurrent ---
def sequence_starts(t: int, n: int) -> Gen:
    """cont (T x N): 0 where a sequence starts; random starts at t = 0 and mid-batch."""
    def gen(r):
        c = (r.random((t, n)) > 0.3).astype(f32)
        c[0, 0], c[0, 1], c[2, 1] = 0, 1, 0  # a fresh start, a carried state and a break mid-batch
        return c
    return gen


RC_FILL = 'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "uniform" min: -0.5 max: 0.5 }'
# x is T=4 x N=3 x (2 x 3); x_static N x (2 x 2); with expose_hidden, h_0 (and c_0) are 1 x N x D
for t, d, states in [("RNN", 5, ("h",)), ("LSTM", 4, ("h", "c"))]:
    for name, static, expose in [("plain", False, False), ("static", True, False),
                                 ("expose_hidden", False, True), ("static_expose_hidden", True, True)]:
        ins = {"x": normal(4, 3, 2, 3), "cont": sequence_starts(4, 3)}
        tops = ["y"]
        if static:
            ins["s"] = normal(3, 2, 2)
        if expose:
            ins |= {f"{s}0": normal(1, 3, d) for s in states}
            tops += [f"{s}T" for s in states]
        blobs = " ".join([f'bottom: "{n}"' for n in ins] + [f'top: "{n}"' for n in tops])
        case(t, name, f'{blobs} recurrent_param {{ num_output: {d} {RC_FILL} expose_hidden: {str(expose).lower()} }}',
             inputs=ins)
case("LSTMUnit", "basic", 'bottom: "c" bottom: "g" bottom: "cont" top: "c1" top: "h1"',
     inputs={"c": normal(1, 3, 4), "g": normal(1, 3, 16, scale=2), "cont": binary(1, 3)})
# Caffe aborts on a forced backward into Filter's selector, and without force_backward skips layers
# that feed no loss: so the filtered blobs come from Parameter layers and feed loss-weighted sums
FILTER_PRE = ('layer { name: "a" type: "Parameter" top: "a" parameter_param { shape { dim: 5 dim: 2 dim: 3 } } } '
              'layer { name: "b" type: "Parameter" top: "b" parameter_param { shape { dim: 5 dim: 4 } } }')
FILTER_POST = ('layer { name: "ra" type: "Reduction" bottom: "ya" top: "ra" loss_weight: 1 reduction_param { operation: SUMSQ } } '
               'layer { name: "rb" type: "Reduction" bottom: "yb" top: "rb" loss_weight: 0.5 reduction_param { operation: SUMSQ } }')
# with nothing kept, Caffe's backward dies (a floating-point exception): that case runs forward only
for name, sel, backward in [("column", [[1], [0], [0], [1], [1]], True), ("flat_values", [0, -0.5, 2, 0, 0.25], True),
                            ("none_kept", [0, 0, 0, 0, 0], False)]:
    case("Filter", name, 'bottom: "a" bottom: "b" bottom: "sel" top: "ya" top: "yb"',
         inputs={"sel": lambda r, sel=sel: np.array(sel, f32)}, pre=FILTER_PRE, post=FILTER_POST,
         backward=backward, force_backward=False, init_params=lambda r, j, shape: r.standard_normal(shape).astype(f32))

# --- losses and accuracy ---
SM = {"x": normal(6, 5, scale=2), "l": labels((6,), 5)}
for name, p in [
    ("valid_default", ""),
    ("ignore_valid", "loss_param { ignore_label: 2 }"),
    ("ignore_full", "loss_param { ignore_label: 2 normalization: FULL }"),
    ("batch_size", "loss_param { normalization: BATCH_SIZE }"),
    ("none", "loss_param { normalization: NONE }"),
    ("normalize_false", "loss_param { normalize: false }"),
    ("loss_weight", "loss_weight: 2.5"),
]:
    case("SoftmaxWithLoss", name, f'bottom: "x" bottom: "l" top: "loss" {p}', inputs=SM)
case("SoftmaxWithLoss", "spatial_ignore", 'bottom: "x" bottom: "l" top: "loss" loss_param { ignore_label: 0 }',
     inputs={"x": normal(2, 4, 3, 3, scale=2), "l": labels((2, 1, 3, 3), 4)})
case("SoftmaxWithLoss", "axis2", 'bottom: "x" bottom: "l" top: "loss" softmax_param { axis: 2 }',
     inputs={"x": normal(2, 3, 5, scale=2), "l": labels((2, 3), 5)})
# no two-top SoftmaxWithLoss: this Caffe cannot build one (without loss_weight, LossLayer adds a single
# weight for two tops; with two, the inner Softmax layer inherits both for its one top)
SCE = {"x": spread(4, 6), "t": binary(4, 6)}
for name, p, inputs in [
    ("default_batch_size", "", SCE),
    ("valid_ignore", "loss_param { ignore_label: -1 normalization: VALID }", {"x": spread(4, 6), "t": binary(4, 6, ignore=-1)}),
    ("full", "loss_param { normalization: FULL }", SCE),
    ("none", "loss_param { normalization: NONE }", SCE),
    ("normalize_true", "loss_param { normalize: true }", SCE),
]:
    case("SigmoidCrossEntropyLoss", name, f'bottom: "x" bottom: "t" top: "loss" {p}', inputs=inputs)
case("EuclideanLoss", "basic", 'bottom: "a" bottom: "b" top: "loss" loss_weight: 0.5',
     inputs={"a": normal(4, 3, 2), "b": normal(4, 3, 2)})
for name, p in [("l1", ""), ("l2", "hinge_loss_param { norm: L2 }")]:
    case("HingeLoss", name, f'bottom: "x" bottom: "l" top: "loss" {p}', inputs={"x": normal(5, 4), "l": labels((5,), 4)})


def write_infogain(tmp_path, r: np.random.Generator) -> None:
    h = r.uniform(0, 1, (4, 4)).astype(f32)
    bp = caffe_pb2.BlobProto()
    bp.shape.dim.extend(h.shape)
    bp.data.extend(h.ravel())
    (tmp_path / "H.binaryproto").write_bytes(bp.SerializeToString())


IG = {"x": normal(5, 4, scale=2), "l": labels((5,), 4)}
case("InfogainLoss", "source", 'bottom: "x" bottom: "l" top: "loss" infogain_loss_param { source: "{tmp}/H.binaryproto" }',
     inputs=IG, prepare=write_infogain)
case("InfogainLoss", "source_ignore_full", 'bottom: "x" bottom: "l" top: "loss" top: "prob" loss_weight: 2 loss_weight: 0 '
     'loss_param { ignore_label: 1 normalization: FULL } infogain_loss_param { source: "{tmp}/H.binaryproto" }',
     inputs=IG, prepare=write_infogain)
case("InfogainLoss", "bottom_H", 'bottom: "x" bottom: "l" bottom: "H" top: "loss"',
     inputs={**IG, "H": uniform(0, 1, 4, 4)}, backward=False, force_backward=False)
case("MultinomialLogisticLoss", "basic", 'bottom: "p" bottom: "l" top: "loss"', inputs={"p": probs(5, 4), "l": labels((5,), 4)})
CL = {"a": normal(6, 4), "b": normal(6, 4), "y": binary(6, 1, 1, 1)}
for name, p in [("margin", "contrastive_loss_param { margin: 1.5 }"),
                ("legacy", "contrastive_loss_param { margin: 3 legacy_version: true }")]:
    case("ContrastiveLoss", name, f'bottom: "a" bottom: "b" bottom: "y" top: "loss" {p}', inputs=CL)
ACC = {"x": normal(8, 5), "l": labels((8,), 5)}
for name, p, tops in [("top1", "", 'top: "acc"'), ("top3", "accuracy_param { top_k: 3 }", 'top: "acc"'),
                      ("ignore", "accuracy_param { ignore_label: 1 }", 'top: "acc"'),
                      ("per_class", "", 'top: "acc" top: "per_class"')]:
    case("Accuracy", name, f'bottom: "x" bottom: "l" {tops} {p}', inputs=ACC, phase=TEST, backward=False,
         force_backward=False)
case("Accuracy", "axis2_spatial", 'bottom: "x" bottom: "l" top: "acc" accuracy_param { axis: 1 top_k: 2 }',
     inputs={"x": normal(2, 3, 4), "l": labels((2, 4), 3)}, phase=TEST, backward=False, force_backward=False)

# --- data layers run from the generic harness ---
case("Input", "two_tops", 'top: "a" top: "b" input_param { shape { dim: 2 dim: 3 } shape { dim: 4 } }',
     backward=False, force_backward=False)
case("DummyData", "constant", 'top: "a" top: "b" dummy_data_param { shape { dim: 2 dim: 3 } shape { dim: 4 } '
     'data_filler { type: "constant" value: 1.5 } data_filler { type: "constant" value: -2 } }',
     backward=False, force_backward=False)
case("DummyData", "legacy_dims", 'top: "a" dummy_data_param { num: 2 channels: 3 height: 1 width: 2 '
     'data_filler { type: "constant" value: 0.5 } }', backward=False, force_backward=False)

# types with their own test functions below
# Python: tests/parity/test_python_layer_parity.py
SPECIAL = {"Data", "HDF5Data", "HDF5Output", "MemoryData", "Dropout", "Python"}

# cases where the engine is known to differ from Caffe: {case id: reason}
KNOWN_DIFFERENCES: dict[str, str] = {}


def net_text(c: Case, arrays: dict[str, np.ndarray], tmp_path) -> str:
    lines = ['name: "parity"']
    if c.force_backward:
        lines.append("force_backward: true")
    if arrays:
        tops = " ".join(f'top: "{n}"' for n in arrays)
        shapes = " ".join("shape { " + " ".join(f"dim: {d}" for d in a.shape) + " }" for a in arrays.values())
        lines.append(f'layer {{ name: "input" type: "Input" {tops} input_param {{ {shapes} }} }}')
    lines.append(c.pre)
    lines.append(f'layer {{ name: "L" type: "{c.type}" {c.body.replace("{tmp}", str(tmp_path))} }}')
    lines.append(c.post)
    return "\n".join(lines) + "\n"


def _params_for(c: Case) -> list:
    marks = []
    if c.id in KNOWN_DIFFERENCES:
        marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_DIFFERENCES[c.id]))
    return marks


@pytest.mark.parametrize("c", [pytest.param(c, id=c.id, marks=_params_for(c)) for c in CASES])
def test_layer(c: Case, tmp_path):
    pycaffe()
    rng = np.random.default_rng(zlib.crc32(c.id.encode()))
    arrays = {n: g(rng) for n, g in c.inputs.items()}
    if c.prepare:
        c.prepare(tmp_path, rng)
    text = net_text(c, arrays, tmp_path)
    cnet = caffe_net(text, c.phase, tmp_path / "net.prototxt")
    enet = engine_net(text, c.phase)
    if c.init_params:
        for blobs in cnet.params.values():
            for j, b in enumerate(blobs):
                b.data[...] = c.init_params(rng, j, b.data.shape)
    copy_params(cnet, enet)
    for n, a in arrays.items():
        cnet.blobs[n].data[...] = a
        enet.blobs[n].data[...] = a

    cnet.forward()
    enet.forward()
    lp = next(lp for lp in prototxt.parse_text(text, caffe_pb2.NetParameter()).layer if lp.name == "L")
    for t in lp.top:
        assert_close(enet.blobs[t].data, cnet.blobs[t].data, f"{c.id}: top '{t}'", **c.tol)
    compare_params(enet, cnet, f"{c.id}: after forward", **c.tol)
    if not c.backward:
        return

    is_loss = c.type.endswith("Loss")
    seed = c.seed_tops if c.seed_tops is not None else (() if is_loss or c.post else tuple(lp.top))
    cnet.clear_param_diffs()
    enet.clear_param_diffs()
    for t in seed:
        g = rng.standard_normal(cnet.blobs[t].data.shape).astype(f32)
        cnet.blobs[t].diff[...] = g
        enet.blobs[t].diff[...] = g
    cnet.backward()
    enet.backward()
    for b in dict.fromkeys(lp.bottom):
        assert_close(enet.blobs[b].diff, cnet.blobs[b].diff, f"{c.id}: bottom '{b}' diff", **c.tol)
    compare_params(enet, cnet, f"{c.id}: param", diff=True, **c.tol)


def test_every_common_type_has_a_case(capsys):
    caffe = pycaffe()
    common = set(caffe.layer_type_list()) & set(layer_types())
    covered = {c.type for c in CASES} | SPECIAL
    with capsys.disabled():
        print(f"\nlayer parity covers {len(common & covered)} types both backends know: "
              f"{', '.join(sorted(common & covered))}")
        print(f"Caffe only: {', '.join(sorted(set(caffe.layer_type_list()) - set(layer_types())))}")
    missing = sorted(common - covered)
    assert not missing, f"layer types both backends support but with no parity case: {missing}"


# --- random layers ---
@pytest.mark.parametrize("ratio", [0.5, 0.2])
def test_dropout_train_follows_caffes_formula_in_both(ratio, tmp_path):
    caffe = pycaffe()
    import torch

    caffe.set_random_seed(5)
    torch.manual_seed(5)
    rng = np.random.default_rng(11)
    x = rng.uniform(0.5, 2.0, (100, 100)).astype(f32)
    g = rng.standard_normal(x.shape).astype(f32)
    text = ('name: "d" force_backward: true layer { name: "input" type: "Input" top: "x" input_param { shape '
            '{ dim: 100 dim: 100 } } } layer { name: "L" type: "Dropout" bottom: "x" top: "y" dropout_param { '
            f'dropout_ratio: {ratio} }} }}')
    scale = f32(1) / (f32(1) - f32(ratio))
    bound = 5 * np.sqrt(ratio * (1 - ratio) / x.size)  # five standard deviations of the dropped fraction
    for which, net in (("caffe", caffe_net(text, TRAIN, tmp_path / "d.prototxt")), ("engine", engine_net(text, TRAIN))):
        net.blobs["x"].data[...] = x
        net.forward()
        y = net.blobs["y"].data.copy()
        kept = y != 0
        np.testing.assert_allclose(y[kept], x[kept] * scale, rtol=1e-6, err_msg=which)
        assert abs(1 - kept.mean() - ratio) < bound, f"{which}: dropped fraction {1 - kept.mean():.4f} vs {ratio}"
        net.blobs["y"].diff[...] = g
        net.backward()
        np.testing.assert_allclose(net.blobs["x"].diff, g * kept * scale, rtol=1e-6, err_msg=which)


# --- data layers with their own sources ---
def _forward_twice_and_compare(text: str, phase: int, tmp_path, tops: tuple[str, ...], what: str):
    cnet = caffe_net(text, phase, tmp_path / "net.prototxt")
    enet = engine_net(text, phase)
    for k in range(3):  # the third batch wraps around the source
        cnet.forward()
        enet.forward()
        for t in tops:
            assert_close(enet.blobs[t].data, cnet.blobs[t].data, f"{what}: forward {k} top '{t}'", rtol=0, atol=1e-7)
    return cnet, enet


def _write_lmdb(path, images: np.ndarray, labels_: np.ndarray) -> str:
    lmdb_io.write_datums(str(path), ((lmdb_io.datum_key(i), lmdb_io.array_to_datum(im, int(lab)))
                                     for i, (im, lab) in enumerate(zip(images, labels_))))
    return str(path)


@pytest.mark.parametrize("name, phase, transform", [
    ("train_scale", TRAIN, "scale: 0.00390625"),
    ("test_crop_mean_values", TEST, "crop_size: 4 mean_value: 100 mean_value: 120 mean_value: 90 scale: 0.5"),
    ("test_mean_file", TEST, 'mean_file: "{tmp}/mean.binaryproto"'),
    ("test_float_data", TEST, "scale: 2"),
])
def test_data_layer_reads_lmdb_like_caffe(name, phase, transform, tmp_path):
    pycaffe()
    rng = np.random.default_rng(3)
    if name == "test_float_data":
        images = rng.standard_normal((5, 3, 6, 7)).astype(f32)
    else:
        images = rng.integers(0, 256, (5, 3, 6, 7), dtype=np.uint8)
    db = _write_lmdb(tmp_path / "db", images, np.arange(5) % 3)
    mean = rng.uniform(0, 255, (3, 6, 7)).astype(f32)
    bp = caffe_pb2.BlobProto(num=1, channels=3, height=6, width=7)
    bp.data.extend(mean.ravel())
    (tmp_path / "mean.binaryproto").write_bytes(bp.SerializeToString())
    text = (f'name: "d" layer {{ name: "L" type: "Data" top: "data" top: "label" transform_param {{ '
            f'{transform.replace("{tmp}", str(tmp_path))} }} data_param {{ source: "{db}" batch_size: 2 backend: LMDB }} }}')
    _forward_twice_and_compare(text, phase, tmp_path, ("data", "label"), f"Data-{name}")


def test_hdf5_data_layer_like_caffe(tmp_path):
    pycaffe()
    rng = np.random.default_rng(5)
    files = []
    for k, n in enumerate((3, 4)):
        path = tmp_path / f"part{k}.h5"
        with h5py.File(path, "w") as f:
            f["data"] = rng.standard_normal((n, 2, 3)).astype(f32)
            f["label"] = rng.integers(0, 5, (n, 1)).astype(f32)
        files.append(str(path))
    (tmp_path / "list.txt").write_text("\n".join(files) + "\n")
    text = (f'name: "h" layer {{ name: "L" type: "HDF5Data" top: "data" top: "label" hdf5_data_param {{ '
            f'source: "{tmp_path}/list.txt" batch_size: 3 }} }}')
    _forward_twice_and_compare(text, TRAIN, tmp_path, ("data", "label"), "HDF5Data")


def test_hdf5_output_layer_writes_what_caffe_writes(tmp_path):
    pycaffe()
    rng = np.random.default_rng(6)
    data, label = rng.standard_normal((3, 2, 2)).astype(f32), rng.integers(0, 4, (3, 1)).astype(f32)
    written = {}
    for which in ("caffe", "engine"):
        out = tmp_path / f"{which}.h5"
        text = ('name: "o" layer { name: "input" type: "Input" top: "d" top: "l" input_param { shape { dim: 3 dim: 2 '
                'dim: 2 } shape { dim: 3 dim: 1 } } } layer { name: "L" type: "HDF5Output" bottom: "d" bottom: "l" '
                f'hdf5_output_param {{ file_name: "{out}" }} }}')
        net = caffe_net(text, TEST, tmp_path / "o.prototxt") if which == "caffe" else engine_net(text, TEST)
        net.blobs["d"].data[...] = data
        net.blobs["l"].data[...] = label
        net.forward()
        del net  # Caffe closes the file in the layer's destructor
        import gc

        gc.collect()
        with h5py.File(out, "r") as f:
            written[which] = {k: np.asarray(f[k]) for k in f}
    assert sorted(written["engine"]) == sorted(written["caffe"])
    for k, v in written["caffe"].items():
        assert written["engine"][k].dtype == v.dtype, k
        np.testing.assert_array_equal(written["engine"][k], v, err_msg=k)


def test_memory_data_layer_like_caffe(tmp_path):
    pycaffe()
    rng = np.random.default_rng(8)
    data = rng.standard_normal((6, 2, 3, 3)).astype(f32)
    lab = rng.integers(0, 5, 6).astype(f32)
    text = ('name: "m" layer { name: "L" type: "MemoryData" top: "data" top: "label" memory_data_param { '
            'batch_size: 2 channels: 2 height: 3 width: 3 } }')
    cnet = caffe_net(text, TRAIN, tmp_path / "m.prototxt")
    enet = engine_net(text, TRAIN)
    cnet.set_input_arrays(data, lab)
    enet.layer("L").set_input_arrays(data, lab)
    for k in range(4):  # 3 batches, then around again
        cnet.forward()
        enet.forward()
        for t in ("data", "label"):
            assert_close(enet.blobs[t].data, cnet.blobs[t].data, f"MemoryData forward {k} top '{t}'", rtol=0, atol=0)


def test_hand_set_diff_without_force_backward(tmp_path):
    pycaffe()
    text = ('name: "h" layer { name: "input" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } } '
            'layer { name: "L" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 2 '
            'weight_filler { type: "gaussian" std: 1 } } }')
    cnet, enet = caffe_net(text, TRAIN, tmp_path / "h.prototxt"), engine_net(text, TRAIN)
    copy_params(cnet, enet)
    rng = np.random.default_rng(1)
    x, g = rng.standard_normal((2, 3)).astype(f32), rng.standard_normal((2, 2)).astype(f32)
    for net in (cnet, enet):
        net.blobs["x"].data[...] = x
        net.forward()
        net.clear_param_diffs()
        net.blobs["y"].diff[...] = g
        net.backward()
    np.testing.assert_array_equal(cnet.params["L"][0].diff, 0)  # Caffe: the layer is not run backward
    compare_params(enet, cnet, "param diff after a hand-set top diff", diff=True)
