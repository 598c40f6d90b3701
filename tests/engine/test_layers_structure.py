"""Structure layers against numpy references written from Caffe's Forward_cpu/Backward_cpu/Reshape."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mpicaffe.errors import UserError
from tests.engine.layer_harness import TRAIN, check_gradients, forward, make_layer


def run_backward(text, *bottoms, top_diffs=None, seed=0):
    """float64 forward + backward; returns tops, top diffs, bottom diffs, learnable-blob diffs."""
    layer, tensors = make_layer(text, bottoms, TRAIN, dtype=torch.float64)
    xs = [t.clone().requires_grad_(True) for t in tensors]
    layer.blobs = [b.clone().requires_grad_(ok) for b, ok in zip(layer.blobs, layer.blob_learnable)]
    tops = layer.forward(xs)
    rng = np.random.default_rng(seed)
    diffs = top_diffs if top_diffs is not None else [rng.standard_normal(t.shape) for t in tops]
    pairs = [(t, torch.as_tensor(d, dtype=torch.float64)) for t, d in zip(tops, diffs) if t.requires_grad]
    if pairs:
        torch.autograd.backward([t for t, _ in pairs], [d for _, d in pairs])
    bottom_diffs = [x.grad.numpy() if x.grad is not None else np.zeros(x.shape) for x in xs]
    blob_diffs = [b.grad.numpy() for b in layer.blobs if b.requires_grad]
    return [t.detach().numpy() for t in tops], diffs, bottom_diffs, blob_diffs


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


# --- Eltwise ---
def test_eltwise_sum_with_coefficients():
    a, b, c = rand(2, 3, 4, seed=1), rand(2, 3, 4, seed=2), rand(2, 3, 4, seed=3)
    text = ('name: "e" type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "y" '
            'eltwise_param { operation: SUM coeff: 2 coeff: -0.5 coeff: 1 }')
    (y,) = forward(text, a, b, c)
    np.testing.assert_allclose(y, 2 * a - 0.5 * b + c, rtol=1e-5, atol=1e-6)
    (y,) = forward('name: "e" type: "Eltwise" bottom: "a" bottom: "b" top: "y"', a, b)
    np.testing.assert_allclose(y, a + b, rtol=1e-6)
    _, (dy,), (da, db, dc), _ = run_backward(text, a, b, c)
    np.testing.assert_allclose(da, 2 * dy)
    np.testing.assert_allclose(db, -0.5 * dy)
    np.testing.assert_allclose(dc, dy)
    check_gradients(text, a, b, c)


def test_eltwise_prod_stable_gradient():
    a, b, c = rand(2, 5, seed=1), rand(2, 5, seed=2), rand(2, 5, seed=3)
    a[0, 0] = 0.0
    text = 'name: "e" type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "y" eltwise_param { operation: PROD }'
    (y,) = forward(text, a, b, c)
    np.testing.assert_allclose(y, a * b * c, rtol=1e-5)
    # Caffe's stable_prod_grad (default): top_diff times the product of the other bottoms
    _, (dy,), (da, db, dc), _ = run_backward(text, a, b, c)
    np.testing.assert_allclose(da, dy * b * c)
    np.testing.assert_allclose(db, dy * a * c)
    np.testing.assert_allclose(dc, dy * a * b)
    check_gradients(text, a, b, c)


def test_eltwise_prod_unstable_gradient_is_top_over_bottom():
    a = np.array([1.0, 0.0, 2.0, 0.0])
    b = np.array([3.0, 4.0, 0.5, 0.0])
    text = ('name: "e" type: "Eltwise" bottom: "a" bottom: "b" top: "y" '
            'eltwise_param { operation: PROD stable_prod_grad: false }')
    dy = np.array([1.0, 2.0, 3.0, 4.0])
    (y,), _, (da, db), _ = run_backward(text, a, b, top_diffs=[dy])
    np.testing.assert_array_equal(y, a * b)
    # Caffe: bottom_diff = top_diff * top / bottom, so a 0 bottom gives 0/0 = NaN
    with np.errstate(divide="ignore", invalid="ignore"):
        np.testing.assert_array_equal(da, dy * (y / a))
        np.testing.assert_array_equal(db, dy * (y / b))
    assert np.isnan(da[1]) and np.isnan(da[3]) and db[1] == 0.0


def caffe_eltwise_max(bottoms, top_diff):
    """Caffe's MAX loops: bottom 0 wins over bottom 1 only if strictly greater; later bottoms
    replace the running max only if strictly greater; the diff goes to the winner."""
    count = bottoms[0].size
    flat = [b.reshape(-1) for b in bottoms]
    top, mask = np.empty(count), np.empty(count, dtype=int)
    for i in range(count):
        if flat[0][i] > flat[1][i]:
            top[i], mask[i] = flat[0][i], 0
        else:
            top[i], mask[i] = flat[1][i], 1
        for k in range(2, len(flat)):
            if flat[k][i] > top[i]:
                top[i], mask[i] = flat[k][i], k
    diffs = [np.where(mask == k, top_diff.reshape(-1), 0.0).reshape(bottoms[0].shape) for k in range(len(flat))]
    return top.reshape(bottoms[0].shape), diffs


def test_eltwise_max_ties_route_like_caffe():
    # ties everywhere: 0 vs 1 goes to bottom 1, a tie with a later bottom stays with the earlier
    a = np.array([[1.0, 2.0, 3.0, 5.0, -1.0]])
    b = np.array([[1.0, 5.0, 0.0, 5.0, -2.0]])
    c = np.array([[1.0, 5.0, 3.0, 5.0, 0.5]])
    text = 'name: "e" type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "y" eltwise_param { operation: MAX }'
    dy = np.array([[10.0, 20.0, 30.0, 40.0, 50.0]])
    (y,), _, diffs, _ = run_backward(text, a, b, c, top_diffs=[dy])
    ref_y, ref_diffs = caffe_eltwise_max([a, b, c], dy)
    np.testing.assert_array_equal(y, ref_y)
    for got, ref in zip(diffs, ref_diffs):
        np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(diffs[1], [[10.0, 20.0, 0.0, 40.0, 0.0]])
    # away from ties autograd's backward is the true gradient
    check_gradients(text, rand(3, 4, seed=1), rand(3, 4, seed=2), rand(3, 4, seed=3))


def test_eltwise_errors():
    a = np.zeros((2, 3))
    with pytest.raises(UserError, match="one coefficient per bottom"):
        make_layer('name: "e" type: "Eltwise" bottom: "a" bottom: "b" top: "y" eltwise_param { coeff: 1 }', [a, a])
    with pytest.raises(UserError, match="only takes coefficients for summation"):
        make_layer('name: "e" type: "Eltwise" bottom: "a" bottom: "b" top: "y" '
                   'eltwise_param { operation: PROD coeff: 1 coeff: 2 }', [a, a])
    with pytest.raises(UserError, match=r"bottom 1 has shape \(3, 2\)"):
        make_layer('name: "e" type: "Eltwise" bottom: "a" bottom: "b" top: "y"', [a, np.zeros((3, 2))])
    with pytest.raises(UserError, match="at least 2 bottom"):
        make_layer('name: "e" type: "Eltwise" bottom: "a" top: "y"', [a])


# --- Concat ---
def test_concat_axis_and_legacy_concat_dim():
    a, b = rand(2, 3, 4, seed=1), rand(2, 1, 4, seed=2)
    (y,) = forward('name: "c" type: "Concat" bottom: "a" bottom: "b" top: "y"', a, b)
    np.testing.assert_array_equal(y, np.concatenate([a, b], axis=1).astype(np.float32))
    c = rand(2, 3, 2, seed=3)
    (y,) = forward('name: "c" type: "Concat" bottom: "a" bottom: "c" top: "y" concat_param { axis: -1 }', a, c)
    assert y.shape == (2, 3, 6)
    (y,) = forward('name: "c" type: "Concat" bottom: "a" bottom: "a" top: "y" concat_param { concat_dim: 0 }', a, a)
    np.testing.assert_array_equal(y, np.concatenate([a, a]).astype(np.float32))
    (y,) = forward('name: "c" type: "Concat" bottom: "a" top: "y"', a)
    np.testing.assert_array_equal(y, a.astype(np.float32))
    text = 'name: "c" type: "Concat" bottom: "a" bottom: "b" top: "y"'
    _, (dy,), (da, db), _ = run_backward(text, a, b)
    np.testing.assert_array_equal(da, dy[:, :3])
    np.testing.assert_array_equal(db, dy[:, 3:])


def test_concat_errors():
    a = np.zeros((2, 3, 4))
    with pytest.raises(UserError, match="either axis or concat_dim"):
        make_layer('name: "c" type: "Concat" bottom: "a" bottom: "b" top: "y" concat_param { axis: 1 concat_dim: 1 }',
                   [a, a])
    with pytest.raises(UserError, match="same shape except at the concat axis 1"):
        make_layer('name: "c" type: "Concat" bottom: "a" bottom: "b" top: "y"', [a, np.zeros((2, 3, 5))])
    with pytest.raises(UserError, match="same number of axes"):
        make_layer('name: "c" type: "Concat" bottom: "a" bottom: "b" top: "y"', [a, np.zeros((2, 3))])
    with pytest.raises(UserError, match="concat_dim 3 out of range"):
        make_layer('name: "c" type: "Concat" bottom: "a" bottom: "b" top: "y" concat_param { concat_dim: 3 }', [a, a])
    with pytest.raises(UserError, match="axis -4 out of range"):
        make_layer('name: "c" type: "Concat" bottom: "a" bottom: "b" top: "y" concat_param { axis: -4 }', [a, a])


# --- Slice ---
def test_slice_points_equal_split_and_slice_dim():
    x = rand(2, 6, 3)
    tops = forward('name: "s" type: "Slice" bottom: "x" top: "a" top: "b" top: "c" '
                   'slice_param { slice_point: 1 slice_point: 4 }', x)
    ref = [x[:, :1], x[:, 1:4], x[:, 4:]]
    for t, r in zip(tops, ref):
        np.testing.assert_array_equal(t, r.astype(np.float32))
    tops = forward('name: "s" type: "Slice" bottom: "x" top: "a" top: "b" top: "c" slice_param { axis: -2 }', x)
    assert [t.shape for t in tops] == [(2, 2, 3)] * 3
    tops = forward('name: "s" type: "Slice" bottom: "x" top: "a" top: "b" slice_param { slice_dim: 0 }', x)
    np.testing.assert_array_equal(tops[1], x[1:].astype(np.float32))
    (t,) = forward('name: "s" type: "Slice" bottom: "x" top: "a"', x)
    np.testing.assert_array_equal(t, x.astype(np.float32))
    text = 'name: "s" type: "Slice" bottom: "x" top: "a" top: "b" slice_param { axis: 2 slice_point: 2 }'
    _, (da, db), (dx,), _ = run_backward(text, x)
    np.testing.assert_array_equal(dx, np.concatenate([da, db], axis=2))


def test_slice_errors():
    x = np.zeros((2, 6))
    with pytest.raises(UserError, match="2 slice_point.*for 2 tops"):
        make_layer('name: "s" type: "Slice" bottom: "x" top: "a" top: "b" slice_param { slice_point: 1 slice_point: 2 }',
                   [x])
    with pytest.raises(UserError, match="increasing and positive"):
        make_layer('name: "s" type: "Slice" bottom: "x" top: "a" top: "b" top: "c" '
                   'slice_param { slice_point: 3 slice_point: 3 }', [x])
    with pytest.raises(UserError, match="increasing and positive"):
        make_layer('name: "s" type: "Slice" bottom: "x" top: "a" top: "b" slice_param { slice_point: 0 }', [x])
    # Caffe would give the last top zero size and fail in forward
    with pytest.raises(UserError, match="leaves nothing for the last top"):
        make_layer('name: "s" type: "Slice" bottom: "x" top: "a" top: "b" slice_param { slice_point: 6 }', [x])
    with pytest.raises(UserError, match=r"number of top blobs \(4\) should evenly divide input slice axis \(6\)"):
        make_layer('name: "s" type: "Slice" bottom: "x" top: "a" top: "b" top: "c" top: "d"', [x])
    with pytest.raises(UserError, match="either axis or slice_dim"):
        make_layer('name: "s" type: "Slice" bottom: "x" top: "a" top: "b" slice_param { axis: 1 slice_dim: 1 }', [x])


# --- Split ---
def test_split_copies_and_sums_diffs():
    x = rand(2, 3)
    text = 'name: "s" type: "Split" bottom: "x" top: "a" top: "b" top: "c"'
    tops, dys, (dx,), _ = run_backward(text, x)
    for t in tops:
        np.testing.assert_array_equal(t, x)
    np.testing.assert_allclose(dx, dys[0] + dys[1] + dys[2])
    with pytest.raises(UserError, match="does not allow in-place"):
        make_layer('name: "s" type: "Split" bottom: "x" top: "x" top: "b"', [x])


# --- Flatten ---
def test_flatten_shapes():
    x = rand(2, 3, 4, 5)
    assert forward('name: "f" type: "Flatten" bottom: "x" top: "y"', x)[0].shape == (2, 60)
    (y,) = forward('name: "f" type: "Flatten" bottom: "x" top: "y" flatten_param { axis: 1 end_axis: 2 }', x)
    np.testing.assert_array_equal(y, x.reshape(2, 12, 5).astype(np.float32))
    assert forward('name: "f" type: "Flatten" bottom: "x" top: "y" flatten_param { axis: 0 }', x)[0].shape == (120,)
    assert forward('name: "f" type: "Flatten" bottom: "x" top: "y" flatten_param { axis: -2 }', x)[0].shape == (2, 3, 20)
    # Caffe: end_axis == axis - 1 merges no axes, count(axis, axis) = 1 inserts an axis of size 1
    assert forward('name: "f" type: "Flatten" bottom: "x" top: "y" flatten_param { axis: 2 end_axis: 1 }',
                   x)[0].shape == (2, 3, 1, 4, 5)
    check_gradients('name: "f" type: "Flatten" bottom: "x" top: "y"', x)


def test_flatten_errors():
    x = np.zeros((2, 3, 4))
    with pytest.raises(UserError, match="in-place"):
        make_layer('name: "f" type: "Flatten" bottom: "x" top: "x"', [x])
    with pytest.raises(UserError, match="end_axis 0 comes before axis 2"):
        make_layer('name: "f" type: "Flatten" bottom: "x" top: "y" flatten_param { axis: 2 end_axis: 0 }', [x])
    with pytest.raises(UserError, match="end_axis 3 out of range"):
        make_layer('name: "f" type: "Flatten" bottom: "x" top: "y" flatten_param { end_axis: 3 }', [x])


# --- Reshape ---
def caffe_reshape_shape(bshape, dims, axis=0, num_axes=-1):
    """Caffe's ReshapeLayer::Reshape shape rule, written independently; None where Caffe fails."""
    n = len(bshape)
    start = axis if axis >= 0 else n + axis + 1
    end = n if num_axes == -1 else start + num_axes
    if not 0 <= start <= n or end > n or dims.count(-1) > 1:
        return None
    top = list(bshape[:start]) + list(dims) + list(bshape[end:])
    for i, d in enumerate(dims):
        if d == 0:
            if start + i >= n:
                return None
            top[start + i] = bshape[start + i]
    if -1 in dims:
        known = int(np.prod([t for j, t in enumerate(top) if j != start + dims.index(-1)]))
        if known == 0 or int(np.prod(bshape)) % known:
            return None
        top[start + dims.index(-1)] = int(np.prod(bshape)) // known
    return tuple(top) if int(np.prod(top)) == int(np.prod(bshape)) else None


@pytest.mark.parametrize("dims, axis, num_axes", [
    ([0, -1], 0, -1),
    ([-1], 0, -1),
    ([2, 3, -1], 0, -1),
    ([0, 0, 20], 0, -1),
    ([6, 0], 0, 2),          # 0 copies bottom axis 1 (3): 6 * 3 != 2 * 3 -> error
    ([3, 0, -1], 1, 2),      # 0 copies bottom axis 2, -1 infers 1
    ([-1, 2], 1, 2),
    ([1, -1], -1, 0),        # axis -1 with num_axes 0 inserts axes at the end
    ([1], 0, 0),             # insert a leading axis
    ([5, 2, 2], 2, -1),
    ([0, 0], 1, 1),          # a 0 past the replaced axes still copies bottom axis start + i
    ([], 1, 1),              # drops axis 1 (size 3): count mismatch -> error
    ([0, -1, 0], 1, 1),      # Caffe: not divisible -> error
])
def test_reshape_rules_match_caffe(dims, axis, num_axes):
    bshape = (2, 3, 4, 5) if dims != [0, 0] else (2, 3, 1, 5)
    x = rand(*bshape)
    text = ('name: "r" type: "Reshape" bottom: "x" top: "y" reshape_param { shape { '
            + " ".join(f"dim: {d}" for d in dims) + f" }} axis: {axis} num_axes: {num_axes} }}")
    want = caffe_reshape_shape(bshape, dims, axis, num_axes)
    if want is None:
        with pytest.raises(UserError):
            forward(text, x)
        return
    (y,) = forward(text, x)
    assert y.shape == want
    np.testing.assert_array_equal(y.reshape(-1), x.astype(np.float32).reshape(-1))


def test_reshape_cases_pinned():
    x = rand(2, 3, 4, 5)
    r = 'name: "r" type: "Reshape" bottom: "x" top: "y" reshape_param {{ shape {{ {} }} {} }}'
    assert forward(r.format("dim: 0 dim: -1", ""), x)[0].shape == (2, 60)
    assert forward(r.format("dim: 3 dim: 0 dim: -1", "axis: 1 num_axes: 2"), x)[0].shape == (2, 3, 4, 1, 5)
    assert forward(r.format("dim: 1 dim: -1", "axis: -1 num_axes: 0"), x)[0].shape == (2, 3, 4, 5, 1, 1)
    assert forward(r.format("dim: 0 dim: 0", "axis: 1 num_axes: 1"), rand(2, 3, 1, 5))[0].shape == (2, 3, 1, 1, 5)
    check_gradients(r.format("dim: -1", ""), x)


def test_reshape_errors():
    x = np.zeros((2, 3, 4))
    r = 'name: "r" type: "Reshape" bottom: "x" top: "y" reshape_param {{ shape {{ {} }} {} }}'
    with pytest.raises(UserError, match="multiple -1 dims"):
        make_layer(r.format("dim: -1 dim: -1", ""), [x])
    with pytest.raises(UserError, match="no corresponding bottom axis to copy"):
        make_layer(r.format("dim: 0 dim: 0 dim: 0 dim: 0", ""), [x])
    with pytest.raises(UserError, match=r"bottom count \(24\) must be divisible by the product of the specified "
                                        r"dimensions \(5\)"):
        make_layer(r.format("dim: 5 dim: -1", ""), [x])
    with pytest.raises(UserError, match="output count must match input count"):
        make_layer(r.format("dim: 5 dim: 5", ""), [x])
    with pytest.raises(UserError, match="axis 4 out of range"):
        make_layer(r.format("dim: 1", "axis: 4"), [x])
    with pytest.raises(UserError, match="axis -5 out of range"):
        make_layer(r.format("dim: 1", "axis: -5"), [x])
    with pytest.raises(UserError, match="num_axes must be >= 0, or -1"):
        make_layer(r.format("dim: 1", "num_axes: -2"), [x])
    with pytest.raises(UserError, match="end_axis = axis \\+ num_axes = 4 is out of range"):
        make_layer(r.format("dim: 1", "axis: 1 num_axes: 3"), [x])


# --- Crop ---
def test_crop_offsets():
    x = rand(2, 4, 6, 7)
    ref = np.zeros((1, 2, 3, 4))
    (y,) = forward('name: "c" type: "Crop" bottom: "x" bottom: "r" top: "y"', x, ref)  # axis 2, offset 0
    np.testing.assert_array_equal(y, x[:, :, :3, :4].astype(np.float32))
    (y,) = forward('name: "c" type: "Crop" bottom: "x" bottom: "r" top: "y" crop_param { offset: 2 }', x, ref)
    np.testing.assert_array_equal(y, x[:, :, 2:5, 2:6].astype(np.float32))
    (y,) = forward('name: "c" type: "Crop" bottom: "x" bottom: "r" top: "y" '
                   'crop_param { axis: 1 offset: 1 offset: 3 offset: 0 }', x, ref)
    np.testing.assert_array_equal(y, x[:, 1:3, 3:6, 0:4].astype(np.float32))
    (y,) = forward('name: "c" type: "Crop" bottom: "x" bottom: "r" top: "y" crop_param { axis: -1 offset: 3 }', x, ref)
    np.testing.assert_array_equal(y, x[:, :, :, 3:7].astype(np.float32))
    (y,) = forward('name: "c" type: "Crop" bottom: "x" bottom: "r" top: "y" crop_param { axis: 0 offset: 1 }',
                   x, np.zeros((1, 3, 5, 6)))
    np.testing.assert_array_equal(y, x[1:2, 1:4, 1:6, 1:7].astype(np.float32))
    text = 'name: "c" type: "Crop" bottom: "x" bottom: "r" top: "y" crop_param { offset: 1 }'
    _, (dy,), (dx, dr), _ = run_backward(text, x, ref)
    want = np.zeros_like(x)
    want[:, :, 1:4, 1:5] = dy
    np.testing.assert_array_equal(dx, want)
    np.testing.assert_array_equal(dr, 0)
    check_gradients(text, x, ref, wrt=[0])


def test_crop_errors():
    x, ref = np.zeros((2, 4, 6, 7)), np.zeros((1, 2, 3, 4))
    with pytest.raises(UserError, match="number of offset values must be 1 or equal"):
        make_layer('name: "c" type: "Crop" bottom: "x" bottom: "r" top: "y" crop_param { offset: 1 offset: 2 offset: 3 }',
                   [x, ref])
    with pytest.raises(UserError, match="the crop for dimension 3 is out-of-bounds with size 4 and offset 4"):
        make_layer('name: "c" type: "Crop" bottom: "x" bottom: "r" top: "y" crop_param { offset: 3 offset: 4 }',
                   [x, ref])
    with pytest.raises(UserError, match="fewer axes"):
        make_layer('name: "c" type: "Crop" bottom: "x" bottom: "r" top: "y"', [x, np.zeros((1, 2, 3))])


# --- Tile ---
def test_tile_forward_and_backward():
    x = rand(2, 3, 2)
    (y,) = forward('name: "t" type: "Tile" bottom: "x" top: "y" tile_param { tiles: 3 }', x)
    # Caffe copies the whole block from `axis` on, tiles times, per outer index
    ref = np.stack([np.concatenate([x[i]] * 3) for i in range(2)])
    np.testing.assert_array_equal(y, ref.astype(np.float32))
    (y,) = forward('name: "t" type: "Tile" bottom: "x" top: "y" tile_param { axis: -1 tiles: 2 }', x)
    np.testing.assert_array_equal(y, np.concatenate([x, x], axis=2).astype(np.float32))
    text = 'name: "t" type: "Tile" bottom: "x" top: "y" tile_param { axis: 0 tiles: 2 }'
    _, (dy,), (dx,), _ = run_backward(text, x)
    np.testing.assert_allclose(dx, dy[:2] + dy[2:])
    check_gradients(text, x)


def test_tile_errors():
    x = np.zeros((2, 3))
    with pytest.raises(UserError, match="number of tiles must be specified"):
        make_layer('name: "t" type: "Tile" bottom: "x" top: "y"', [x])
    with pytest.raises(UserError, match="number of tiles must be positive"):
        make_layer('name: "t" type: "Tile" bottom: "x" top: "y" tile_param { tiles: 0 }', [x])


# --- Reduction ---
@pytest.mark.parametrize("op, axis, coeff", [
    ("SUM", 0, 1.0), ("SUM", 1, 2.0), ("ASUM", 1, 1.0), ("ASUM", -1, -0.5),
    ("SUMSQ", 2, 1.0), ("SUMSQ", 0, 3.0), ("MEAN", 1, 1.0), ("MEAN", 0, 2.0)])
def test_reduction_ops(op, axis, coeff):
    x = rand(2, 3, 4)
    x[0, 0, 0] = 0.0
    text = f'name: "r" type: "Reduction" bottom: "x" top: "y" reduction_param {{ operation: {op} axis: {axis} coeff: {coeff} }}'
    (y,) = forward(text, x)
    ax = axis % 3
    rows = x.reshape(int(np.prod(x.shape[:ax])), -1)
    ref = {"SUM": rows.sum(1), "ASUM": np.abs(rows).sum(1), "SUMSQ": (rows ** 2).sum(1),
           "MEAN": rows.sum(1) / rows.shape[1]}[op] * coeff
    assert y.shape == x.shape[:ax]
    np.testing.assert_allclose(y.reshape(-1), ref, rtol=1e-5, atol=1e-6)
    _, (dy,), (dx,), _ = run_backward(text, x)
    g = np.repeat(np.asarray(dy).reshape(-1, 1), rows.shape[1], axis=1)
    # Caffe's Backward_cpu: SUM/MEAN coeff * dy, ASUM sign(x) * coeff * dy (0 at 0), SUMSQ 2 x coeff dy
    want = {"SUM": coeff * g, "MEAN": coeff / rows.shape[1] * g, "ASUM": np.sign(rows) * coeff * g,
            "SUMSQ": 2 * rows * coeff * g}[op]
    np.testing.assert_allclose(dx.reshape(rows.shape), want, rtol=1e-12)


def test_reduction_default_is_sum_to_scalar_and_gradcheck():
    x = rand(3, 4)
    (y,) = forward('name: "r" type: "Reduction" bottom: "x" top: "y"', x)
    assert y.shape == () and np.isclose(y, x.sum(), rtol=1e-5)
    check_gradients('name: "r" type: "Reduction" bottom: "x" top: "y" reduction_param { operation: SUMSQ axis: 1 }', x)
    with pytest.raises(UserError, match="axis 2 out of range"):
        make_layer('name: "r" type: "Reduction" bottom: "x" top: "y" reduction_param { axis: 2 }', [x])


# --- ArgMax ---
def caffe_argmax_rows(rows, k):
    """Caffe's partial_sort of (value, index) pairs with std::greater: ties put the larger index first."""
    out_i, out_v = [], []
    for row in rows:
        pairs = sorted(((v, j) for j, v in enumerate(row)), reverse=True)[:k]
        out_i.append([j for _, j in pairs])
        out_v.append([v for v, _ in pairs])
    return np.array(out_i, dtype=float), np.array(out_v)


def test_argmax_ties_and_shapes_without_axis():
    x = np.array([[3.0, 1.0, 3.0, 2.0, 3.0], [0.0, 0.0, 1.0, 1.0, 0.0]])
    (y,) = forward('name: "a" type: "ArgMax" bottom: "x" top: "y" argmax_param { top_k: 3 out_max_val: true }', x)
    idx, val = caffe_argmax_rows(x, 3)
    assert y.shape == (2, 2, 3)
    np.testing.assert_array_equal(y[:, 0], idx)
    np.testing.assert_array_equal(y[:, 1], val)
    np.testing.assert_array_equal(idx[0], [4, 2, 0])
    (y,) = forward('name: "a" type: "ArgMax" bottom: "x" top: "y"', x)
    assert y.shape == (2, 1, 1)
    np.testing.assert_array_equal(y.reshape(-1), [4, 3])
    # the shape has max(num_axes, 3) axes: (N, 1 or 2, top_k, 1, ...)
    x4 = np.round(rand(2, 3, 2, 2) * 2)
    (y,) = forward('name: "a" type: "ArgMax" bottom: "x" top: "y" argmax_param { top_k: 2 }', x4)
    assert y.shape == (2, 1, 2, 1)
    np.testing.assert_array_equal(y.reshape(2, 2), caffe_argmax_rows(x4.reshape(2, -1), 2)[0])
    (y,) = forward('name: "a" type: "ArgMax" bottom: "x" top: "y" argmax_param { out_max_val: true }', rand(2, 3, 1, 2, 2))
    assert y.shape == (2, 2, 1, 1, 1)
    (y,) = forward('name: "a" type: "ArgMax" bottom: "x" top: "y"', np.array([1.0, 2.0]))
    assert y.shape == (2, 1, 1) and np.all(y == 0)


def test_argmax_with_axis():
    x = np.round(rand(2, 4, 3) * 2)
    (y,) = forward('name: "a" type: "ArgMax" bottom: "x" top: "y" argmax_param { axis: 1 top_k: 2 }', x)
    assert y.shape == (2, 2, 3)
    rows = x.transpose(0, 2, 1).reshape(-1, 4)
    idx, val = caffe_argmax_rows(rows, 2)
    np.testing.assert_array_equal(y.transpose(0, 2, 1).reshape(-1, 2), idx)
    (y,) = forward('name: "a" type: "ArgMax" bottom: "x" top: "y" argmax_param { axis: -2 top_k: 2 out_max_val: true }',
                   x)
    np.testing.assert_array_equal(y.transpose(0, 2, 1).reshape(-1, 2), val)


def test_argmax_has_no_gradient_and_errors():
    layer, (x,) = make_layer('name: "a" type: "ArgMax" bottom: "x" top: "y"', [rand(2, 3)])
    (y,) = layer.forward([x.requires_grad_(True)])
    assert not y.requires_grad
    with pytest.raises(UserError, match="top_k must not be less than 1"):
        make_layer('name: "a" type: "ArgMax" bottom: "x" top: "y" argmax_param { top_k: 0 }', [rand(2, 3)])
    with pytest.raises(UserError, match=r"dimension of the flattened bottom blob per instance \(6\)"):
        make_layer('name: "a" type: "ArgMax" bottom: "x" top: "y" argmax_param { top_k: 7 }', [rand(2, 3, 2)])
    with pytest.raises(UserError, match=r"dimension of the axis \(2\)"):
        make_layer('name: "a" type: "ArgMax" bottom: "x" top: "y" argmax_param { top_k: 3 axis: 2 }', [rand(2, 3, 2)])


# --- Silence ---
def test_silence_has_no_tops():
    layer, xs = make_layer('name: "s" type: "Silence" bottom: "a" bottom: "b"', [rand(2), rand(3)])
    assert layer.forward(xs) == []
    with pytest.raises(UserError, match="exactly 0 top"):
        make_layer('name: "s" type: "Silence" bottom: "a" top: "y"', [rand(2)])


# --- Embed ---
def test_embed_forward_backward_and_blobs():
    text = ('name: "e" type: "Embed" bottom: "x" top: "y" embed_param { num_output: 3 input_dim: 4 '
            'weight_filler { type: "gaussian" std: 1 } bias_filler { type: "constant" value: 0.5 } }')
    layer, _ = make_layer(text, [np.zeros((2, 2))])
    assert [tuple(b.shape) for b in layer.blobs] == [(4, 3), (3,)] and layer.blob_learnable == [True, True]
    np.testing.assert_array_equal(layer.blobs[1].numpy(), [0.5] * 3)
    w, b = rand(4, 3), np.array([0.1, -0.2, 0.3])
    x = np.array([[0.0, 3.0], [3.0, 1.0]])
    (y,) = forward(text, x, blobs=[w, b])
    assert y.shape == (2, 2, 3)
    np.testing.assert_allclose(y, w[x.astype(int)] + b, rtol=1e-6)
    _, (dy,), _, (dw, db) = run_backward(text, x)
    ref_dw = np.zeros((4, 3))
    np.add.at(ref_dw, x.astype(int).reshape(-1), dy.reshape(-1, 3))
    np.testing.assert_allclose(dw, ref_dw)
    np.testing.assert_allclose(db, dy.reshape(-1, 3).sum(0))
    check_gradients(text, x, wrt=[])
    no_bias = 'name: "e" type: "Embed" bottom: "x" top: "y" embed_param { num_output: 2 input_dim: 3 bias_term: false }'
    layer, _ = make_layer(no_bias, [x])
    assert len(layer.blobs) == 1 and np.all(layer.blobs[0].numpy() == 0)  # default filler: constant 0


def test_embed_errors():
    text = 'name: "e" type: "Embed" bottom: "x" top: "y" embed_param { num_output: 3 input_dim: 4 }'
    layer, _ = make_layer(text, [np.zeros(3)])
    with pytest.raises(UserError, match=r"bottom holds 4, not an integer index in \[0, input_dim = 4\)"):
        layer.forward([torch.tensor([0.0, 4.0, 1.0])])
    with pytest.raises(UserError, match="bottom holds -1"):
        layer.forward([torch.tensor([-1.0])])
    with pytest.raises(UserError, match="bottom holds 1.5"):
        layer.forward([torch.tensor([1.5])])
    with pytest.raises(UserError, match="num_output must be positive"):
        make_layer('name: "e" type: "Embed" bottom: "x" top: "y" embed_param { input_dim: 4 }', [np.zeros(3)])
    with pytest.raises(UserError, match="input_dim must be positive"):
        make_layer('name: "e" type: "Embed" bottom: "x" top: "y" embed_param { num_output: 4 }', [np.zeros(3)])


# --- Parameter ---
def test_parameter_layer_exposes_its_blob():
    text = 'name: "p" type: "Parameter" top: "y" parameter_param { shape { dim: 2 dim: 3 } }'
    layer, _ = make_layer(text, [])
    assert [tuple(b.shape) for b in layer.blobs] == [(2, 3)] and layer.blob_learnable == [True]
    w = rand(2, 3)
    (y,) = forward(text, blobs=[w])
    np.testing.assert_array_equal(y, w.astype(np.float32))
    _, (dy,), _, (dw,) = run_backward(text)
    np.testing.assert_array_equal(dw, dy)
    check_gradients(text)
    with pytest.raises(UserError, match="exactly 0 bottom"):
        make_layer('name: "p" type: "Parameter" bottom: "x" top: "y"', [w])


# --- BatchReindex ---
def test_batch_reindex_forward_and_accumulating_backward():
    x = rand(3, 2, 2)
    idx = np.array([2.0, 0.0, 2.0, 2.0])
    text = 'name: "b" type: "BatchReindex" bottom: "x" bottom: "i" top: "y"'
    (y,) = forward(text, x, idx)
    np.testing.assert_array_equal(y, x[[2, 0, 2, 2]].astype(np.float32))
    _, (dy,), (dx, di), _ = run_backward(text, x, idx)
    ref = np.zeros_like(x)
    np.add.at(ref, idx.astype(int), dy)
    np.testing.assert_allclose(dx, ref)
    np.testing.assert_array_equal(di, 0)
    check_gradients(text, x, idx, wrt=[0])


def test_batch_reindex_errors():
    text = 'name: "b" type: "BatchReindex" bottom: "x" bottom: "i" top: "y"'
    x = np.zeros((3, 2))
    with pytest.raises(UserError, match="exactly one axis"):
        make_layer(text, [x, np.zeros((2, 1))])
    layer, _ = make_layer(text, [x, np.zeros(2)])
    with pytest.raises(UserError, match="was negative"):
        layer.forward([torch.zeros(3, 2), torch.tensor([0.0, -1.0])])
    with pytest.raises(UserError, match=r"index 3 .*greater than batch size \(3\)"):
        layer.forward([torch.zeros(3, 2), torch.tensor([3.0])])
