"""How important each output channel of a group is, and which channels to remove.

Every criterion gives a *removal order* (least important first) and the score each channel had
when it was removed; a ratio removes a prefix of that order, a threshold removes channels while
their score is below it. At least one channel of every group is always kept.

  l1          mean |w| over the channel's weights (the L1 norm divided by the fan-in, so layers
              with different fan-ins compare); jointly pruned layers are averaged
  l2          root mean square of the channel's weights
  activation  mean |activation| of the channel in the layer's top blob after the forward pass (so
              after in-place layers such as ReLU), over every sample and spatial position
  apoptosis   neurons that are near-constant or duplicate another neuron do not contribute: the
              score is std / (mean std of the layer) * (1 - max |correlation| with a neuron still
              kept), and channels are removed greedily, lowest score first, recomputing the
              correlations among the kept ones (of two identical neurons, one survives)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from mpicaffe.errors import UserError
from mpicaffe.prune.dependencies import Group


def weight_scores(group: Group, weights: dict[str, list[np.ndarray]], kind: str) -> np.ndarray:
    """l1 or l2 score per channel from the members' weight blobs (`weights[layer][0]`)."""
    per_member = []
    for m in group.members:
        w = np.moveaxis(np.asarray(weights[m][0], np.float64), group.weight_axis(m), 0).reshape(group.channels, -1)
        per_member.append(np.abs(w).mean(1) if kind == "l1" else np.sqrt((w * w).mean(1)))
    return np.mean(per_member, axis=0)


@dataclass
class ActivationStats:
    """Running sums over samples of one group's channels (float64)."""

    channels: int
    count: int = 0
    sum: np.ndarray = field(init=False)
    sum_abs: np.ndarray = field(init=False)
    cross: np.ndarray = field(init=False)  # sum of x x^T

    def __post_init__(self) -> None:
        self.sum = np.zeros(self.channels)
        self.sum_abs = np.zeros(self.channels)
        self.cross = np.zeros((self.channels, self.channels))

    def add(self, x: torch.Tensor) -> None:
        """Add a blob (N, C, ...): each (sample, position) is one observation of the C channels."""
        rows = torch.movedim(x.detach().to(torch.float64), 1, -1).reshape(-1, self.channels)
        self.count += rows.shape[0]
        self.sum += rows.sum(0).cpu().numpy()
        self.sum_abs += rows.abs().sum(0).cpu().numpy()
        self.cross += (rows.T @ rows).cpu().numpy()

    def mean(self) -> np.ndarray:
        return self.sum / max(self.count, 1)

    def std(self) -> np.ndarray:
        n = max(self.count, 1)
        return np.sqrt(np.maximum(np.diag(self.cross) / n - self.mean() ** 2, 0.0))

    def correlation(self) -> np.ndarray:
        n = max(self.count, 1)
        mean, std = self.mean(), self.std()
        cov = self.cross / n - np.outer(mean, mean)
        denom = np.outer(std, std)
        return np.divide(cov, denom, out=np.zeros_like(cov), where=denom > 0)


def collect_activations(net, groups: list[Group], batches: int, feed=None) -> dict[str, ActivationStats]:
    """Run `batches` forward passes of engine `net` (calling `feed(net)` first, if given, to set its
    inputs) and gather activation statistics of each group's members' top blobs."""
    stats = {g.name: ActivationStats(g.channels) for g in groups}
    tops = {lp.name: lp.top[0] for lp in (layer.param for layer in net.layers)}
    for _ in range(batches):
        if feed is not None:
            feed(net)
        with torch.no_grad():
            net.forward()
        for g in groups:
            for m in g.members:
                if m in tops:
                    stats[g.name].add(net.blobs[tops[m]].tensor)
    return stats


def removal_order(kind: str, scores: np.ndarray | None = None,
                  stats: ActivationStats | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(channel indices, least important first; each one's score when removed), for all but the
    most important channel. l1/l2 take `scores`; activation and apoptosis take `stats`."""
    if kind == "activation":
        scores = stats.sum_abs / max(stats.count, 1)
    if kind != "apoptosis":
        order = np.argsort(scores, kind="stable")[:-1]
        return order, scores[order]
    return _apoptosis_order(stats)


def _apoptosis_order(stats: ActivationStats) -> tuple[np.ndarray, np.ndarray]:
    std = stats.std()
    rel = std / std.mean() if std.mean() > 0 else np.zeros_like(std)
    corr = np.abs(stats.correlation())
    np.fill_diagonal(corr, 0.0)
    kept = np.ones(stats.channels, bool)
    order, scores = [], []
    for _ in range(stats.channels - 1):
        redundancy = np.where(kept[None, :], corr, 0.0).max(1)
        importance = np.where(kept, rel * (1.0 - redundancy), np.inf)
        k = int(np.argmin(importance))
        order.append(k)
        scores.append(importance[k])
        kept[k] = False
    return np.array(order, np.int64), np.array(scores)


@dataclass
class Amounts:
    """A --ratio or --threshold value: a default for every layer and per-layer values."""

    flag: str
    default: float | None = None
    per_layer: dict[str, float] = field(default_factory=dict)

    def for_group(self, group: Group) -> float | None:
        for m in group.members:
            if m in self.per_layer:
                return self.per_layer[m]
        return self.default


def parse_amounts(text: str, flag: str) -> Amounts:
    """Parse `0.5`, `conv1=0.5,ip1=0.3` or `0.2,conv1=0.5` (a default plus per-layer values)."""
    out = Amounts(flag)
    for part in (p.strip() for p in text.split(",")):
        name, sep, value = part.rpartition("=")
        try:
            number = float(value)
        except ValueError:
            raise UserError(f"{flag}: '{part}' is not a number or LAYER=NUMBER") from None
        if not math.isfinite(number) or number < 0 or (flag == "--ratio" and number > 1):
            raise UserError(f"{flag}: {value} is out of range ({'0 to 1' if flag == '--ratio' else '>= 0'})")
        if not sep:
            if out.default is not None:
                raise UserError(f"{flag}: more than one value without a layer name in '{text}'")
            out.default = number
        elif not name:
            raise UserError(f"{flag}: '{part}' has no layer name before '='")
        else:
            out.per_layer[name] = number
    return out


def choose(order: np.ndarray, scores: np.ndarray, channels: int, ratio: float | None = None,
           threshold: float | None = None) -> np.ndarray:
    """The channels to remove (sorted): the first floor(ratio * channels) of `order`, or its
    prefix whose scores are below `threshold`; never all of them."""
    if ratio is not None:
        n = min(math.floor(ratio * channels + 1e-9), channels - 1)
    else:
        above = np.nonzero(scores >= threshold)[0]
        n = int(above[0]) if above.size else len(order)
    return np.sort(order[:n])
