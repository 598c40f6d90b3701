"""Structure layers: Eltwise, Concat, Slice, Split, Flatten, Reshape, Crop, Tile, Reduction,
ArgMax, Silence, Embed, Parameter, BatchReindex, Filter.

Most move or combine values without arithmetic, so autograd's backward is Caffe's exactly
(Concat/Slice/Crop route diffs back, Split and Tile sum them, Eltwise MAX sends each diff to the
bottom its forward picked). Eltwise PROD with stable_prod_grad false keeps Caffe's top / bottom
backward in a small autograd Function. ArgMax has no backward; its tops never require grad.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mpicaffe.backends.engine.layers import register
from mpicaffe.backends.engine.layers.base import Layer, check_axis
from mpicaffe.proto import caffe_pb2


def _count(shape, start: int = 0, end: int | None = None) -> int:
    return math.prod(shape[start:end])


def _check_in_place(layer: Layer) -> None:
    for top in layer.param.top:
        if top in layer.param.bottom:
            raise layer.error(f"{layer.type} does not allow in-place computation (top '{top}' is also a bottom)")


class _ProdTopOverBottom(torch.autograd.Function):
    """Product of the bottoms; backward is Caffe's stable_prod_grad: false rule, top / bottom_i
    (inf or NaN where a bottom is 0, as in Caffe)."""

    @staticmethod
    def forward(ctx, *xs):
        y = xs[0] * xs[1]
        for x in xs[2:]:
            y = y * x
        ctx.save_for_backward(y, *xs)
        return y

    @staticmethod
    def backward(ctx, g):
        y, *xs = ctx.saved_tensors
        return tuple(g * (y / x) for x in xs)


@register
class Eltwise(Layer):
    """Caffe's Eltwise layer: SUM (with coefficients), PROD or MAX of equally shaped bottoms."""

    type = "Eltwise"
    min_bottoms = 2
    min_tops = max_tops = 1

    def setup(self, bottoms):
        p = self.param.eltwise_param
        if len(p.coeff) not in (0, len(bottoms)):
            raise self.error(f"takes one coefficient per bottom blob: {len(p.coeff)} coeff for "
                             f"{len(bottoms)} bottoms")
        if p.operation == caffe_pb2.EltwiseParameter.PROD and len(p.coeff):
            raise self.error("only takes coefficients for summation (operation: SUM), not for PROD")
        self._check_shapes(bottoms)

    def _check_shapes(self, bottoms) -> None:
        for i, b in enumerate(bottoms[1:], 1):
            if b.shape != bottoms[0].shape:
                raise self.error(f"bottom {i} has shape {tuple(b.shape)} but bottom 0 has shape "
                                 f"{tuple(bottoms[0].shape)}; all bottoms must have the same shape")

    def forward(self, bottoms):
        self._check_shapes(bottoms)
        p = self.param.eltwise_param
        op = p.operation
        if op == caffe_pb2.EltwiseParameter.SUM:
            coeff = list(p.coeff) or [1.0] * len(bottoms)
            y = bottoms[0] if coeff[0] == 1 else bottoms[0] * coeff[0]
            for c, x in zip(coeff[1:], bottoms[1:]):
                y = torch.add(y, x, alpha=c)
            return [y]
        if op == caffe_pb2.EltwiseParameter.PROD:
            if not p.stable_prod_grad:
                return [_ProdTopOverBottom.apply(*bottoms)]
            y = bottoms[0] * bottoms[1]
            for x in bottoms[2:]:
                y = y * x
            return [y]
        if op == caffe_pb2.EltwiseParameter.MAX:
            # Caffe: bottom 0 wins over bottom 1 only if strictly greater (a tie goes to bottom 1),
            # later bottoms only where strictly greater; where() routes each diff to the winner
            x0, x1 = bottoms[0], bottoms[1]
            y = torch.where(x0 > x1, x0, x1)
            for x in bottoms[2:]:
                y = torch.where(x > y, x, y)
            return [y]
        raise self.error(f"unknown eltwise operation {op}")


def _legacy_axis(layer: Layer, x: torch.Tensor, value: int, what: str) -> int:
    # concat_dim / slice_dim: a uint32 axis, no negative indexing
    if value >= x.dim():
        raise layer.error(f"{what} {value} out of range for a {x.dim()}-axis bottom")
    return value


@register
class Concat(Layer):
    """Caffe's Concat layer: joins the bottoms along `axis` (or the legacy concat_dim)."""

    type = "Concat"
    min_bottoms = 1
    min_tops = max_tops = 1

    def setup(self, bottoms):
        p = self.param.concat_param
        if p.HasField("axis") and p.HasField("concat_dim"):
            raise self.error("either axis or concat_dim should be specified, not both")
        self._axis(bottoms)

    def _axis(self, bottoms) -> int:
        p = self.param.concat_param
        x = bottoms[0]
        axis = (_legacy_axis(self, x, p.concat_dim, "concat_dim") if p.HasField("concat_dim")
                else check_axis(self, p.axis, x.dim()))
        for i, b in enumerate(bottoms[1:], 1):
            if b.dim() != x.dim():
                raise self.error(f"all inputs must have the same number of axes: bottom {i} has shape "
                                 f"{tuple(b.shape)}, bottom 0 {tuple(x.shape)}")
            if any(b.shape[j] != x.shape[j] for j in range(x.dim()) if j != axis):
                raise self.error(f"all inputs must have the same shape except at the concat axis {axis}: "
                                 f"bottom {i} has shape {tuple(b.shape)}, bottom 0 {tuple(x.shape)}")
        return axis

    def forward(self, bottoms):
        axis = self._axis(bottoms)
        if len(bottoms) == 1:
            return [bottoms[0].view_as(bottoms[0])]
        return [torch.cat(bottoms, dim=axis)]


@register
class Slice(Layer):
    """Caffe's Slice layer: cuts the bottom along `axis` at slice_point (or into equal parts)."""

    type = "Slice"
    min_bottoms = max_bottoms = 1
    min_tops = 1

    def setup(self, bottoms):
        p = self.param.slice_param
        if p.HasField("axis") and p.HasField("slice_dim"):
            raise self.error("either axis or slice_dim should be specified, not both")
        self._sizes(bottoms[0])

    def _sizes(self, x: torch.Tensor) -> tuple[int, list[int]]:
        p = self.param.slice_param
        axis = (_legacy_axis(self, x, p.slice_dim, "slice_dim") if p.HasField("slice_dim")
                else check_axis(self, p.axis, x.dim()))
        n, tops = x.shape[axis], len(self.param.top)
        if p.slice_point:
            if len(p.slice_point) != tops - 1:
                raise self.error(f"{len(p.slice_point)} slice_point(s) for {tops} tops; give one fewer "
                                 "slice_point than tops")
            if tops > n:
                raise self.error(f"{tops} tops exceed the {n} entries of axis {axis}")
            sizes, prev = [], 0
            for point in p.slice_point:
                if point <= prev:
                    raise self.error(f"slice_point values must be increasing and positive, got "
                                     f"{list(p.slice_point)}")
                sizes.append(point - prev)
                prev = point
            if prev >= n:
                # Caffe gives the last top zero (or negative) size and fails
                raise self.error(f"slice_point {prev} leaves nothing for the last top: axis {axis} has {n} entries")
            return axis, sizes + [n - prev]
        if n % tops:
            raise self.error(f"number of top blobs ({tops}) should evenly divide input slice axis ({n})")
        return axis, [n // tops] * tops

    def forward(self, bottoms):
        x = bottoms[0]
        axis, sizes = self._sizes(x)
        if len(sizes) == 1:
            return [x.view_as(x)]
        return list(torch.split(x, sizes, dim=axis))


@register
class Split(Layer):
    """Caffe's Split layer: one bottom to several identical tops (their diffs add up)."""

    type = "Split"
    min_bottoms = max_bottoms = 1
    min_tops = 1

    def setup(self, bottoms):
        _check_in_place(self)

    def forward(self, bottoms):
        x = bottoms[0]
        return [x.view_as(x) for _ in self.param.top]


@register
class Flatten(Layer):
    """Caffe's Flatten layer: merges axes axis..end_axis into one."""

    type = "Flatten"
    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def setup(self, bottoms):
        _check_in_place(self)
        self._shape(bottoms[0])

    def _shape(self, x: torch.Tensor) -> list[int]:
        p = self.param.flatten_param
        start = check_axis(self, p.axis, x.dim())
        end = check_axis(self, p.end_axis, x.dim(), "end_axis")
        if end + 1 < start:
            raise self.error(f"end_axis {p.end_axis} comes before axis {p.axis}")
        # end_axis == axis - 1 flattens no axes: Caffe inserts an axis of size 1 there
        shape = list(x.shape)
        return shape[:start] + [_count(shape, start, end + 1)] + shape[end + 1:]

    def forward(self, bottoms):
        return [bottoms[0].reshape(self._shape(bottoms[0]))]


@register
class Reshape(Layer):
    """Caffe's Reshape layer: new shape for axes axis..axis+num_axes (0 copies, -1 infers)."""

    type = "Reshape"
    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def setup(self, bottoms):
        _check_in_place(self)
        dims = list(self.param.reshape_param.shape.dim)
        if dims.count(-1) > 1:
            raise self.error(f"new shape {dims} contains multiple -1 dims; at most a single (1) value of -1 "
                             "may be specified")
        if any(d < -1 for d in dims):
            raise self.error(f"new shape {dims} has a dimension below -1 (0 copies a bottom axis, -1 infers one)")
        self._shape(bottoms[0])

    def _shape(self, x: torch.Tensor) -> list[int]:
        p = self.param.reshape_param
        dims = list(p.shape.dim)
        bshape, naxes = list(x.shape), x.dim()
        start = p.axis if p.axis >= 0 else naxes + p.axis + 1
        if not 0 <= start <= naxes:
            raise self.error(f"axis {p.axis} out of range for a {naxes}-axis bottom")
        if p.num_axes < -1:
            raise self.error(f"num_axes must be >= 0, or -1 for all; got {p.num_axes}")
        end = naxes if p.num_axes == -1 else start + p.num_axes
        if end > naxes:
            raise self.error(f"end_axis = axis + num_axes = {end} is out of range for a {naxes}-axis bottom")
        top = bshape[:start] + dims + bshape[end:]
        copy_axes = [i for i, d in enumerate(dims) if d == 0]
        for i in copy_axes:
            # Caffe copies bottom axis start + i, whatever num_axes says
            if start + i >= naxes:
                raise self.error(f"new shape {dims} contains a 0, but there was no corresponding bottom axis "
                                 f"to copy (bottom shape {tuple(bshape)})")
            top[start + i] = bshape[start + i]
        if -1 in dims:
            known = (math.prod(d for d in dims if d > 0) * _count(bshape, 0, start) * _count(bshape, end)
                     * math.prod(top[start + i] for i in copy_axes))
            if known == 0 or x.numel() % known:
                raise self.error(f"bottom count ({x.numel()}) must be divisible by the product of the specified "
                                 f"dimensions ({known})")
            top[start + dims.index(-1)] = x.numel() // known
        if math.prod(top) != x.numel():
            raise self.error(f"output count must match input count: new shape {top} holds {math.prod(top)} "
                             f"values, the bottom {tuple(bshape)} holds {x.numel()}")
        return top

    def forward(self, bottoms):
        return [bottoms[0].reshape(self._shape(bottoms[0]))]


@register
class Crop(Layer):
    """Caffe's Crop layer: crops bottom 0 to the shape of bottom 1 on axes from `axis` on."""

    type = "Crop"
    min_bottoms = max_bottoms = 2
    min_tops = max_tops = 1

    def setup(self, bottoms):
        p = self.param.crop_param
        x = bottoms[0]
        start = check_axis(self, p.axis, x.dim())
        if len(p.offset) > 1 and start + len(p.offset) != x.dim():
            raise self.error(f"{len(p.offset)} offsets given: the number of offset values must be 1 or equal "
                             f"the number of axes from axis {start} on ({x.dim() - start})")
        self._window(bottoms)

    def _window(self, bottoms) -> tuple[slice, ...]:
        p = self.param.crop_param
        x, ref = bottoms
        start = check_axis(self, p.axis, x.dim())
        if ref.dim() < x.dim():
            raise self.error(f"bottom 1 (shape {tuple(ref.shape)}) has fewer axes than bottom 0 "
                             f"(shape {tuple(x.shape)})")
        window = [slice(None)] * x.dim()
        for i in range(start, x.dim()):
            offset = p.offset[0] if len(p.offset) == 1 else (p.offset[i - start] if p.offset else 0)
            if x.shape[i] - offset < ref.shape[i]:
                raise self.error(f"the crop for dimension {i} is out-of-bounds with size {ref.shape[i]} and "
                                 f"offset {offset} (bottom 0 has {x.shape[i]})")
            window[i] = slice(offset, offset + ref.shape[i])
        return tuple(window)

    def forward(self, bottoms):
        return [bottoms[0][self._window(bottoms)]]


@register
class Tile(Layer):
    """Caffe's Tile layer: repeats the bottom `tiles` times along `axis`."""

    type = "Tile"
    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def setup(self, bottoms):
        p = self.param.tile_param
        if not p.HasField("tiles"):
            raise self.error("number of tiles must be specified (tile_param { tiles: ... })")
        if p.tiles <= 0:
            raise self.error(f"number of tiles must be positive, got {p.tiles}")
        check_axis(self, p.axis, bottoms[0].dim())

    def forward(self, bottoms):
        x = bottoms[0]
        p = self.param.tile_param
        reps = [1] * x.dim()
        reps[check_axis(self, p.axis, x.dim())] = p.tiles
        return [x.repeat(reps)]


@register
class Reduction(Layer):
    """Caffe's Reduction layer: SUM, ASUM, SUMSQ or MEAN over all axes from `axis` on, times coeff."""

    type = "Reduction"
    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def setup(self, bottoms):
        check_axis(self, self.param.reduction_param.axis, bottoms[0].dim())

    def forward(self, bottoms):
        x = bottoms[0]
        p = self.param.reduction_param
        axis = check_axis(self, p.axis, x.dim())
        outer, dim = _count(x.shape, 0, axis), _count(x.shape, axis)
        rows = x.reshape(outer, dim)
        op = p.operation
        coeff = p.coeff
        if op in (caffe_pb2.ReductionParameter.SUM, caffe_pb2.ReductionParameter.MEAN):
            y = rows.sum(dim=1)
            if op == caffe_pb2.ReductionParameter.MEAN:
                coeff = coeff / dim
        elif op == caffe_pb2.ReductionParameter.ASUM:
            y = rows.abs().sum(dim=1)
        elif op == caffe_pb2.ReductionParameter.SUMSQ:
            y = (rows * rows).sum(dim=1)
        else:
            raise self.error(f"unknown reduction operation {op}")
        if coeff != 1:
            y = y * coeff
        return [y.reshape(x.shape[:axis])]


@register
class ArgMax(Layer):
    """Caffe's ArgMax layer: indices (and optionally values) of the top_k largest entries."""

    type = "ArgMax"
    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def setup(self, bottoms):
        self._check(bottoms[0])

    def _check(self, x: torch.Tensor) -> int | None:
        p = self.param.argmax_param
        if p.top_k < 1:
            raise self.error(f"top_k must not be less than 1, got {p.top_k}")
        if p.HasField("axis"):
            axis = check_axis(self, p.axis, x.dim())
            if p.top_k > x.shape[axis]:
                raise self.error(f"top_k ({p.top_k}) must be less than or equal to the dimension of the axis "
                                 f"({x.shape[axis]})")
            return axis
        if p.top_k > _count(x.shape, 1):
            raise self.error(f"top_k ({p.top_k}) must be less than or equal to the dimension of the flattened "
                             f"bottom blob per instance ({_count(x.shape, 1)})")
        return None

    @torch.no_grad()
    def forward(self, bottoms):
        x = bottoms[0]
        axis = self._check(x)
        p = self.param.argmax_param
        k = p.top_k
        rows = x.movedim(axis, -1) if axis is not None else x.reshape(x.shape[0], -1)
        n = rows.shape[-1]
        # Caffe sorts (value, index) pairs descending: equal values put the larger index first;
        # a stable descending sort of the reversed row keeps exactly that order
        values, rev = torch.sort(rows.flip(-1), dim=-1, descending=True, stable=True)
        values = values[..., :k]
        indices = (n - 1 - rev[..., :k]).to(x.dtype)
        if axis is not None:
            return [(values if p.out_max_val else indices).movedim(-1, axis).contiguous()]
        # without axis: shape (N, 1 or 2, top_k, 1, ...) with at least 3 axes
        shape = [1] * max(x.dim(), 3)
        shape[0], shape[1], shape[2] = x.shape[0], 2 if p.out_max_val else 1, k
        out = torch.stack([indices, values], dim=1) if p.out_max_val else indices
        return [out.reshape(shape)]


@register
class Silence(Layer):
    """Caffe's Silence layer: consumes its bottoms and produces nothing."""

    type = "Silence"
    min_bottoms = 1
    min_tops = max_tops = 0

    def forward(self, bottoms):
        # Caffe's backward writes zero diffs; with no tops, autograd sends nothing back
        return []


@register
class Embed(Layer):
    """Caffe's Embed layer: looks up rows of a (input_dim, num_output) weight by integer index."""

    type = "Embed"
    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1
    allow_force_backward = (False,)

    def setup(self, bottoms):
        p = self.param.embed_param
        if p.num_output <= 0:
            raise self.error(f"num_output must be positive, got {p.num_output}")
        if p.input_dim <= 0:
            raise self.error(f"input_dim must be positive, got {p.input_dim}")
        self.add_blob((p.input_dim, p.num_output), p.weight_filler)
        if p.bias_term:
            self.add_blob((p.num_output,), p.bias_filler)

    def forward(self, bottoms):
        x = bottoms[0].detach()
        p = self.param.embed_param
        index = x.long()
        bad = (index < 0) | (index >= p.input_dim) | (index != x)
        if bool(bad.any()):
            value = x[bad][0].item()
            raise self.error(f"bottom holds {value:g}, not an integer index in [0, input_dim = {p.input_dim})")
        weight = self.blobs[0].to(x.dtype)
        y = F.embedding(index, weight)
        if p.bias_term:
            y = y + self.blobs[1].to(x.dtype)
        return [y]


@register
class Parameter(Layer):
    """Caffe's Parameter layer: one top holding a learnable blob of parameter_param.shape."""

    type = "Parameter"
    min_bottoms = max_bottoms = 0
    min_tops = max_tops = 1

    def setup(self, bottoms):
        dims = list(self.param.parameter_param.shape.dim)
        if any(d < 0 for d in dims):
            raise self.error(f"parameter_param.shape {dims} has a negative dimension")
        self.add_blob(dims)

    def forward(self, bottoms):
        # Caffe's top shares the blob's data and diff; a view keeps it one tensor for autograd
        return [self.blobs[0].view_as(self.blobs[0])]


@register
class BatchReindex(Layer):
    """Caffe's BatchReindex layer: picks items of bottom 0 along its first axis by the indices in
    bottom 1."""

    type = "BatchReindex"
    min_bottoms = max_bottoms = 2
    min_tops = max_tops = 1
    allow_force_backward = (True, False)

    def setup(self, bottoms):
        if bottoms[1].dim() != 1:
            raise self.error(f"bottom 1 (the indices) must have exactly one axis, got shape "
                             f"{tuple(bottoms[1].shape)}")

    def forward(self, bottoms):
        x, ridx = bottoms[0], bottoms[1].detach()
        if ridx.dim() != 1:
            raise self.error(f"bottom 1 (the indices) must have exactly one axis, got shape {tuple(ridx.shape)}")
        if bool((ridx < 0).any()):
            raise self.error(f"index {ridx[ridx < 0][0].item():g} specified for reindex layer was negative")
        if bool((ridx >= x.shape[0]).any()):
            raise self.error(f"index {ridx[ridx >= x.shape[0]][0].item():g} specified for reindex layer was "
                             f"greater than batch size ({x.shape[0]})")
        return [x.index_select(0, ridx.long())]


@register
class Filter(Layer):
    """Caffe's Filter layer: keeps the items (along axis 0) of each bottom but the last where the
    last bottom, the selector, is nonzero. Top i is bottom i filtered; its first axis depends on
    the selector's values."""

    type = "Filter"
    min_bottoms = 2
    min_tops = 1

    def setup(self, bottoms):
        if len(self.param.top) != len(bottoms) - 1:
            raise self.error(f"takes one top per bottom but the last (the selector): {len(bottoms) - 1} "
                             f"top(s) for {len(bottoms)} bottoms, got {len(self.param.top)}")
        # Caffe's first Reshape keeps every item, whatever the selector holds
        self._first_reshape = True
        self._check(bottoms)

    def _check(self, bottoms) -> None:
        selector = bottoms[-1]
        if selector.dim() < 1 or any(d != 1 for d in selector.shape[1:]):
            raise self.error(f"the selector (last bottom) must have shape (N,) or (N, 1, ...): all dimensions "
                             f"singletons (1) except the first, got {tuple(selector.shape)}")
        for i, b in enumerate(bottoms[:-1]):
            if b.dim() < 1 or b.shape[0] != selector.shape[0]:
                raise self.error(f"bottom {i} (shape {tuple(b.shape)}) must have the selector's "
                                 f"{selector.shape[0]} items on axis 0")

    def infer_tops(self, bottoms):
        self._check(bottoms)
        if self._first_reshape:
            self._first_reshape = False
            return [torch.zeros_like(b) for b in bottoms[:-1]]
        return super().infer_tops(bottoms)

    def forward(self, bottoms):
        self._check(bottoms)
        # Caffe never backpropagates into the selector; the kept rows get their top's diff, the
        # others zero, which is index_select's gradient
        keep = bottoms[-1].detach().reshape(-1).nonzero().squeeze(1)
        return [b.index_select(0, keep) for b in bottoms[:-1]]
