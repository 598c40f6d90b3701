"""Softmax, the loss layers and Accuracy.

A loss layer's first top is a 0-axis tensor (Caffe's shape []). Where Caffe's Backward_cpu is
not the gradient of its forward (log clamped at FLT_MIN or kLOG_THRESHOLD yet differentiated as
if unclamped, ContrastiveLoss's + 1e-4, the Caffe sigmoid in SigmoidCrossEntropyLoss, a second
probability top whose diff Caffe ignores), a small autograd Function states Caffe's backward.
Labels are float tensors read as Caffe's static_cast<int> (truncation toward zero); a label out
of range (other than ignore_label) is a clear error instead of Caffe's unchecked memory read.
Accuracy and the probability tops never require grad.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from mpicaffe import prototxt
from mpicaffe.backends.engine.layers import register
from mpicaffe.backends.engine.layers.base import Layer, check_axis
from mpicaffe.data.mean_file import blobproto_to_array
from mpicaffe.proto import caffe_pb2

FLT_MIN = float(np.finfo(np.float32).tiny)
# Caffe's kLOG_THRESHOLD is a float constant 1e-20
LOG_THRESHOLD = float(np.float32(1e-20))

_Norm = caffe_pb2.LossParameter


def _legacy_dim(layer: Layer, x: torch.Tensor, i: int) -> int:
    """Caffe's num()/channels()/height()/width(): 1 past the last axis, an error beyond 4 axes."""
    if x.dim() > 4:
        raise layer.error(f"Caffe reads this bottom with the 4-axis accessors; got shape {tuple(x.shape)}")
    return x.shape[i] if i < x.dim() else 1


def _split_at(x: torch.Tensor, axis: int) -> tuple[int, int, int]:
    return math.prod(x.shape[:axis]), x.shape[axis], math.prod(x.shape[axis + 1:])


def _split_with_labels(layer: Layer, x: torch.Tensor, label: torch.Tensor, axis: int,
                       what: str) -> tuple[int, int, int]:
    """(outer, channels, inner) of predictions `x` around `axis`, checking one label per position."""
    outer, channels, inner = _split_at(x, axis)
    if outer * inner != label.numel():
        raise layer.error(
            f"number of labels must match number of predictions; e.g., if {what} axis == 1 and prediction "
            f"shape is (N, C, H, W), label count (number of labels) must be N*H*W, with integer values in "
            f"{{0, 1, ..., C-1}}; here {label.numel()} labels for prediction shape {tuple(x.shape)}, "
            f"axis {axis}")
    return outer, channels, inner


def _class_labels(layer: Layer, label: torch.Tensor, num_classes: int,
                  ignore_label: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer class indices (0 where ignored) and the mask of positions that count."""
    label = label.detach()
    if label.is_floating_point() and not bool((label == label.trunc()).all()):
        # Caffe truncates (static_cast<int>): a label 2.7 would count as class 2, silently
        value = label[label != label.trunc()][0].item()
        raise layer.error(f"label {value:g} is not an integer: class labels are whole numbers")
    index = label.long()  # static_cast<int>
    valid = index != ignore_label if ignore_label is not None else torch.ones_like(index, dtype=torch.bool)
    bad = valid & ((index < 0) | (index >= num_classes))
    if bool(bad.any()):
        value = label[bad][0].item()
        also = f" and is not ignore_label {ignore_label}" if ignore_label is not None else ""
        raise layer.error(f"label {value:g} is out of range: it must be in [0, {num_classes}){also}")
    return torch.where(valid, index, torch.zeros_like(index)), valid


def _normalizer(mode: int, outer: int, inner: int, valid: torch.Tensor, dtype) -> torch.Tensor:
    """Caffe's LossLayer::GetNormalizer, max(1, n)."""
    if mode == _Norm.VALID:
        n = valid.sum().to(dtype)
    elif mode == _Norm.FULL:
        n = torch.tensor(float(outer * inner), dtype=dtype)
    elif mode == _Norm.BATCH_SIZE:
        n = torch.tensor(float(outer), dtype=dtype)
    elif mode == _Norm.NONE:
        n = torch.tensor(1.0, dtype=dtype)
    else:
        raise ValueError(f"unknown normalization mode {mode}")
    return torch.clamp(n.to(valid.device), min=1.0)


class _Loss(Layer):
    """Caffe's LossLayer: two bottoms (data, label), a scalar top; labels get no diff."""

    min_bottoms = max_bottoms = 2
    min_tops = max_tops = 1
    allow_force_backward = (True, False)

    def setup(self, bottoms):
        self.check_bottoms(bottoms)

    def check_bottoms(self, bottoms) -> None:
        x, label = bottoms[0], bottoms[1]
        if x.dim() == 0 or label.dim() == 0 or x.shape[0] != label.shape[0]:
            raise self.error(f"the data and label should have the same first dimension: shapes "
                             f"{tuple(x.shape)} and {tuple(label.shape)}")

    def ignore_label(self) -> int | None:
        p = self.param.loss_param
        return p.ignore_label if p.HasField("ignore_label") else None


@register
class Softmax(Layer):
    """Caffe's Softmax layer along `axis`."""

    type = "Softmax"
    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def setup(self, bottoms):
        check_axis(self, self.param.softmax_param.axis, bottoms[0].dim())

    def forward(self, bottoms):
        x = bottoms[0]
        # Caffe subtracts the max, exponentiates and divides by the sum; its backward
        # (dy - sum(dy * y)) * y is softmax's true gradient
        return [torch.softmax(x, dim=check_axis(self, self.param.softmax_param.axis, x.dim()))]


class _SoftmaxLossFn(torch.autograd.Function):
    """-log(max(p_label, FLT_MIN)) summed over counted positions / normalizer; x is (outer, C, inner)."""

    @staticmethod
    def forward(ctx, x, index, valid, normalizer):
        prob = torch.softmax(x, dim=1)
        p = prob.gather(1, index.unsqueeze(1)).squeeze(1)
        loss = torch.where(valid, -torch.log(torch.clamp(p, min=FLT_MIN)), torch.zeros_like(p))
        ctx.save_for_backward(prob, index, valid, normalizer)
        ctx.mark_non_differentiable(prob)
        return loss.sum() / normalizer, prob

    @staticmethod
    def backward(ctx, g, _g_prob):
        # Caffe: (prob - onehot) * top_diff / normalizer, zero at ignored positions, whatever the
        # FLT_MIN clamp did in forward; the probability top's diff is not used
        prob, index, valid, normalizer = ctx.saved_tensors
        grad = prob.clone()
        grad.scatter_add_(1, index.unsqueeze(1), -torch.ones_like(prob[:, :1]))
        grad.mul_(valid.unsqueeze(1)).mul_(g / normalizer)
        return grad, None, None, None


@register
class SoftmaxWithLoss(_Loss):
    """Caffe's SoftmaxWithLoss layer (multinomial logistic loss of a softmax), optionally also
    giving the probabilities."""

    type = "SoftmaxWithLoss"
    max_tops = 2

    def normalization(self) -> int:
        p = self.param.loss_param
        if not p.HasField("normalization") and p.HasField("normalize"):
            return _Norm.VALID if p.normalize else _Norm.BATCH_SIZE
        return p.normalization

    def forward(self, bottoms):
        self.check_bottoms(bottoms)
        x, label = bottoms
        axis = check_axis(self, self.param.softmax_param.axis, x.dim())
        outer, channels, inner = _split_with_labels(self, x, label, axis, "softmax")
        index, valid = _class_labels(self, label.reshape(outer, inner), channels, self.ignore_label())
        normalizer = _normalizer(self.normalization(), outer, inner, valid, x.dtype)
        loss, prob = _SoftmaxLossFn.apply(x.reshape(outer, channels, inner), index, valid, normalizer)
        if len(self.param.top) == 2:
            # real Caffe (2018) aborts at setup with two tops (its inner Softmax copies the loss
            # weights); the probabilities are given here as its ShareData would
            return [loss, prob.reshape(x.shape)]
        return [loss]


class _SigmoidCrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, target, valid, normalizer):
        pos = (x >= 0).to(x.dtype)
        # Caffe's stable form, with its log(1 + exp(.)) rather than log1p
        loss = -(x * (target - pos) - torch.log(1 + torch.exp(x - 2 * x * pos)))
        if valid is not None:
            loss = torch.where(valid, loss, torch.zeros_like(loss))
        ctx.save_for_backward(x, target, valid, normalizer)
        return loss.sum() / normalizer

    @staticmethod
    def backward(ctx, g):
        x, target, valid, normalizer = ctx.saved_tensors
        # Caffe: (sigmoid(x) - target) * top_diff / normalizer, its sigmoid 0.5 * tanh(0.5 x) + 0.5
        grad = torch.tanh(x * 0.5).mul_(0.5).add_(0.5).sub_(target)
        if valid is not None:
            grad.mul_(valid)
        return grad.mul_(g / normalizer), None, None, None


@register
class SigmoidCrossEntropyLoss(_Loss):
    """Caffe's SigmoidCrossEntropyLoss layer."""

    type = "SigmoidCrossEntropyLoss"

    def normalization(self) -> int:
        # unlike SoftmaxWithLoss, BATCH_SIZE when neither normalization nor normalize is set
        p = self.param.loss_param
        if p.HasField("normalization"):
            return p.normalization
        if p.HasField("normalize"):
            return _Norm.VALID if p.normalize else _Norm.BATCH_SIZE
        return _Norm.BATCH_SIZE

    def check_bottoms(self, bottoms):
        super().check_bottoms(bottoms)
        if bottoms[0].numel() != bottoms[1].numel():
            raise self.error(f"inputs must have the same count: shapes {tuple(bottoms[0].shape)} and "
                             f"{tuple(bottoms[1].shape)}")

    def forward(self, bottoms):
        self.check_bottoms(bottoms)
        x, target = bottoms
        target = target.detach().reshape(x.shape).to(x.dtype)
        ignore = self.ignore_label()
        valid = target.long() != ignore if ignore is not None else None
        outer = x.shape[0]
        inner = x.numel() // outer if outer else 0
        counted = valid if valid is not None else torch.ones(x.shape, dtype=torch.bool, device=x.device)
        normalizer = _normalizer(self.normalization(), outer, inner, counted, x.dtype)
        return [_SigmoidCrossEntropyFn.apply(x, target, valid, normalizer)]


@register
class EuclideanLoss(_Loss):
    """Caffe's EuclideanLoss layer: sum((a - b)^2) / 2N; both bottoms get diffs."""

    type = "EuclideanLoss"
    allow_force_backward = True

    def check_bottoms(self, bottoms):
        super().check_bottoms(bottoms)
        a, b = bottoms
        if math.prod(a.shape[1:]) != math.prod(b.shape[1:]):
            raise self.error(f"inputs must have the same dimension: shapes {tuple(a.shape)} and {tuple(b.shape)}")

    def forward(self, bottoms):
        self.check_bottoms(bottoms)
        a, b = bottoms
        diff = a - b.reshape(a.shape)
        return [(diff * diff).sum() / _legacy_dim(self, a, 0) / 2]


@register
class HingeLoss(_Loss):
    """Caffe's HingeLoss layer (one-vs-all, L1 or L2 norm)."""

    type = "HingeLoss"

    def forward(self, bottoms):
        self.check_bottoms(bottoms)
        x, label = bottoms
        num = _legacy_dim(self, x, 0)
        rows = x.reshape(num, -1)
        index, _ = _class_labels(self, label.reshape(-1)[:num], rows.shape[1], None)
        sign = torch.ones_like(rows).scatter_(1, index.unsqueeze(1), -1.0)
        # autograd's backward is Caffe's: relu's 0 at the kink equals its caffe_cpu_sign(0)
        margin = torch.relu(1 + sign * rows)
        if self.param.hinge_loss_param.norm == caffe_pb2.HingeLossParameter.L2:
            return [(margin * margin).sum() / num]
        return [margin.sum() / num]


class _InfogainLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, index, valid, infogain, normalizer):
        prob = torch.softmax(x, dim=1)
        rows = infogain[index].permute(0, 2, 1)  # H[label, l] laid out as (outer, C, inner)
        per_item = -(rows * torch.log(torch.clamp(prob, min=LOG_THRESHOLD))).sum(dim=1)
        loss = torch.where(valid, per_item, torch.zeros_like(per_item))
        ctx.save_for_backward(prob, index, valid, infogain, normalizer)
        ctx.mark_non_differentiable(prob)
        return loss.sum() / normalizer, prob

    @staticmethod
    def backward(ctx, g, _g_prob):
        # Caffe: prob * rowsum(H)[label] - H[label, :], zero at ignored positions, times
        # top_diff / normalizer; it ignores the kLOG_THRESHOLD clamp and the probability top's diff
        prob, index, valid, infogain, normalizer = ctx.saved_tensors
        row_sums = infogain.sum(dim=1)[index].unsqueeze(1)
        grad = prob * row_sums - infogain[index].permute(0, 2, 1)
        grad.mul_(valid.unsqueeze(1)).mul_(g / normalizer)
        return grad, None, None, None, None


@register
class InfogainLoss(_Loss):
    """Caffe's InfogainLoss layer (2018: softmax inside, then an infogain-weighted log loss)."""

    type = "InfogainLoss"
    max_bottoms = 3
    max_tops = 2
    allow_force_backward = (True, False, False)

    def setup(self, bottoms):
        super().setup(bottoms)
        p = self.param.loss_param
        if p.HasField("normalize"):
            raise self.error('loss_param.normalize is deprecated for InfogainLoss; use "normalization"')
        self._infogain = None
        if len(bottoms) < 3:
            source = self.param.infogain_loss_param.source
            if not self.param.infogain_loss_param.HasField("source"):
                raise self.error("infogain matrix source must be specified (infogain_loss_param { source: ... }) "
                                 "or given as a third bottom")
            try:
                matrix = blobproto_to_array(prototxt.read_blob(source))
            except ValueError as e:
                raise self.error(f"infogain matrix {source}: {e}") from None
            self._infogain = torch.from_numpy(matrix).to(self.device)

    def forward(self, bottoms):
        self.check_bottoms(bottoms)
        x, label = bottoms[0], bottoms[1]
        axis = check_axis(self, self.param.infogain_loss_param.axis, x.dim())
        outer, channels, inner = _split_with_labels(self, x, label, axis, "infogain")
        infogain = bottoms[2] if len(bottoms) == 3 else self._infogain
        if infogain.numel() != channels * channels:
            raise self.error(f"the infogain matrix H must be {channels}x{channels}, got shape "
                             f"{tuple(infogain.shape)}")
        infogain = infogain.detach().reshape(channels, channels).to(device=x.device, dtype=x.dtype)
        index, valid = _class_labels(self, label.reshape(outer, inner), channels, self.ignore_label())
        normalizer = _normalizer(self.param.loss_param.normalization, outer, inner, valid, x.dtype)
        loss, prob = _InfogainLossFn.apply(x.reshape(outer, channels, inner), index, valid, infogain, normalizer)
        if len(self.param.top) == 2:
            return [loss, prob.reshape(x.shape)]
        return [loss]


class _MultinomialLogisticFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, index):
        p = torch.clamp(rows.gather(1, index.unsqueeze(1)), min=LOG_THRESHOLD)
        ctx.save_for_backward(p, index)
        ctx.shape = rows.shape
        return -torch.log(p).sum() / rows.shape[0]

    @staticmethod
    def backward(ctx, g):
        # Caffe: -top_diff / N / max(p_label, kLOG_THRESHOLD) at the label, also where clamped
        p, index = ctx.saved_tensors
        grad = torch.zeros(ctx.shape, dtype=p.dtype, device=p.device)
        grad.scatter_(1, index.unsqueeze(1), (-g / ctx.shape[0]) / p)
        return grad, None


@register
class MultinomialLogisticLoss(_Loss):
    """Caffe's MultinomialLogisticLoss layer: bottom 0 holds probabilities."""

    type = "MultinomialLogisticLoss"

    def check_bottoms(self, bottoms):
        super().check_bottoms(bottoms)
        label = bottoms[1]
        if any(_legacy_dim(self, label, i) != 1 for i in (1, 2, 3)):
            raise self.error(f"the label must hold one value per item (channels, height and width 1), got shape "
                             f"{tuple(label.shape)}")

    def forward(self, bottoms):
        self.check_bottoms(bottoms)
        x, label = bottoms
        num = _legacy_dim(self, x, 0)
        rows = x.reshape(num, -1)
        index, _ = _class_labels(self, label.reshape(-1), rows.shape[1], None)
        return [_MultinomialLogisticFn.apply(rows, index)]


class _ContrastiveFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, similar, margin, legacy):
        diff = a - b
        dist_sq = (diff * diff).sum(dim=1)
        if legacy:
            dissimilar = torch.clamp(margin - dist_sq, min=0)
        else:
            dissimilar = torch.clamp(margin - torch.sqrt(dist_sq), min=0) ** 2
        loss = torch.where(similar, dist_sq, dissimilar).sum() / a.shape[0] / 2
        ctx.save_for_backward(diff, dist_sq, similar)
        ctx.margin, ctx.legacy = margin, legacy
        return loss

    @staticmethod
    def backward(ctx, g):
        # Caffe: similar pairs diff / N; dissimilar ones -diff / N (legacy) or
        # -(margin - d) / (d + 1e-4) * diff / N, and 0 where margin - d (or margin - d^2) <= 0
        diff, dist_sq, similar = ctx.saved_tensors
        if ctx.legacy:
            mdist = ctx.margin - dist_sq
            beta = -torch.ones_like(dist_sq)
        else:
            dist = torch.sqrt(dist_sq)
            mdist = ctx.margin - dist
            beta = -mdist / (dist + 1e-4)
        beta = torch.where(mdist > 0, beta, torch.zeros_like(beta))
        coeff = torch.where(similar, torch.ones_like(beta), beta)
        grad = diff * (coeff * (g / diff.shape[0])).unsqueeze(1)
        return grad, -grad, None, None, None


@register
class ContrastiveLoss(_Loss):
    """Caffe's ContrastiveLoss layer for pairs of (N, C) features and an (N,) similarity label."""

    type = "ContrastiveLoss"
    min_bottoms = max_bottoms = 3
    allow_force_backward = (True, True, False)

    def check_bottoms(self, bottoms):
        super().check_bottoms(bottoms)
        a, b, y = bottoms
        if _legacy_dim(self, a, 1) != _legacy_dim(self, b, 1):
            raise self.error(f"bottoms 0 and 1 must have the same channels: shapes {tuple(a.shape)} and "
                             f"{tuple(b.shape)}")
        for i, t in ((0, a), (1, b)):
            if _legacy_dim(self, t, 2) != 1 or _legacy_dim(self, t, 3) != 1:
                raise self.error(f"bottom {i} must have height and width 1, got shape {tuple(t.shape)}")
        if y.dim() == 0 or y.shape[0] != a.shape[0] or any(_legacy_dim(self, y, i) != 1 for i in (1, 2, 3)):
            raise self.error(f"bottom 2 (the similarity label) must hold one value per pair, got shape "
                             f"{tuple(y.shape)} for {tuple(a.shape)} features")

    def forward(self, bottoms):
        self.check_bottoms(bottoms)
        a, b, y = bottoms
        num, channels = _legacy_dim(self, a, 0), _legacy_dim(self, a, 1)
        similar = y.detach().reshape(-1)[:num].long() != 0  # static_cast<int>(y) != 0
        p = self.param.contrastive_loss_param
        return [_ContrastiveFn.apply(a.reshape(num, channels), b.reshape(num, channels), similar, p.margin,
                                     p.legacy_version)]


@register
class Accuracy(Layer):
    """Caffe's Accuracy layer: top-k accuracy, and optionally per-class accuracy; no backward."""

    type = "Accuracy"
    min_bottoms = max_bottoms = 2
    min_tops, max_tops = 1, 2
    allow_force_backward = False

    def setup(self, bottoms):
        self._split(bottoms)

    def _split(self, bottoms) -> tuple[int, int, int]:
        x, label = bottoms
        p = self.param.accuracy_param
        if label.numel() == 0 or p.top_k > x.numel() // label.numel():
            raise self.error(f"top_k ({p.top_k}) must be less than or equal to the number of classes")
        axis = check_axis(self, p.axis, x.dim())
        outer, channels, inner = _split_at(x, axis)
        if outer * inner != label.numel():
            raise self.error(
                f"number of labels must match number of predictions; e.g., if label axis == 1 and prediction "
                f"shape is (N, C, H, W), label count (number of labels) must be N*H*W, with integer values in "
                f"{{0, 1, ..., C-1}}; here {label.numel()} labels for prediction shape {tuple(x.shape)}, "
                f"axis {axis}")
        return outer, channels, inner

    @torch.no_grad()
    def forward(self, bottoms):
        x, label = bottoms[0].detach(), bottoms[1].detach()
        outer, channels, inner = self._split([x, label])
        p = self.param.accuracy_param
        ignore = p.ignore_label if p.HasField("ignore_label") else None
        index, valid = _class_labels(self, label.reshape(outer, inner), channels, ignore)
        scores = x.reshape(outer, channels, inner)
        true_score = scores.gather(1, index.unsqueeze(1))
        # Caffe: right if fewer than top_k other classes score >= the true class (a tie counts
        # against it; a NaN true score compares false with everything, itself too, and counts as right)
        better = (scores >= true_score).sum(dim=1) - 1
        right = (better < p.top_k) & valid
        count = valid.sum()
        accuracy = (right.sum().double() / count.clamp(min=1).double()).to(x.dtype)
        tops = [accuracy.reshape(())]
        if len(self.param.top) == 2:
            per_class = torch.zeros(channels, dtype=torch.float64, device=x.device)
            seen = torch.bincount(index[valid], minlength=channels).double()
            hits = torch.bincount(index[right], minlength=channels).double()
            per_class = torch.where(seen > 0, hits / seen.clamp(min=1), per_class)
            tops.append(per_class.to(x.dtype))
        return tops
