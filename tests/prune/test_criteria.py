"""Criteria: scores, removal orders, and the --ratio/--threshold values."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mpicaffe.errors import UserError
from mpicaffe.prune import criteria
from mpicaffe.prune.dependencies import Edit, Group


def _stats(columns: list[np.ndarray]) -> criteria.ActivationStats:
    x = np.stack(columns, axis=1)  # (samples, channels)
    stats = criteria.ActivationStats(x.shape[1])
    stats.add(torch.from_numpy(x[:, :, None, None]))  # as an N x C x 1 x 1 blob
    return stats


def test_apoptosis_removes_constant_then_duplicate_neurons_keeping_one_of_a_pair():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(500), rng.standard_normal(500)
    stats = _stats([a, b, np.full(500, 3.0), 2 * a + 1])
    order, scores = criteria.removal_order("apoptosis", stats=stats)
    # first the constant neuron and one of the correlated pair (both score 0 up to rounding)
    first = set(order[:2].tolist())
    assert 2 in first and len(first & {0, 3}) == 1 and max(scores[:2]) < 1e-6
    assert scores[2] > 0.5  # the twin that is left is no longer redundant
    assert criteria.choose(order, scores, 4, ratio=0.5).tolist() == sorted(first)
    assert criteria.choose(order, scores, 4, threshold=0.1).tolist() == sorted(first)


def test_activation_orders_by_mean_absolute_value():
    stats = _stats([np.array([1.0, -1.0]), np.array([0.0, 0.1]), np.array([-5.0, 5.0])])
    order, scores = criteria.removal_order("activation", stats=stats)
    assert order.tolist() == [1, 0] and np.allclose(scores, [0.05, 1.0])


def test_weight_scores_average_jointly_pruned_members():
    w_a = np.array([[1.0, -1.0], [0.0, 2.0], [3.0, 3.0]])
    w_b = np.array([[1.0, 1.0], [0.0, 0.0], [1.0, -1.0]])
    ident = np.arange(3).reshape(3, 1)
    group = Group(("a", "b"), 3, [Edit("a", 0, 0, ident, source=True), Edit("b", 0, 1, ident),
                                  Edit("b", 0, 0, ident, source=True), Edit("c", 0, 1, ident)])
    l1 = criteria.weight_scores(group, {"a": [w_a], "b": [w_b]}, "l1")
    assert np.allclose(l1, [1.0, 0.5, 2.0])
    l2 = criteria.weight_scores(group, {"a": [w_a], "b": [w_b]}, "l2")
    assert np.allclose(l2, [1.0, np.sqrt(2) / 2, 2.0])


def test_choose_never_removes_every_channel():
    order, scores = criteria.removal_order("l1", np.array([0.0, 0.0, 0.0]))
    assert criteria.choose(order, scores, 3, ratio=1.0).size == 2
    assert criteria.choose(order, scores, 3, threshold=1.0).size == 2
    assert criteria.choose(order, scores, 3, ratio=0.0).size == 0


def test_amounts_default_and_per_layer():
    a = criteria.parse_amounts("0.2, conv1=0.5,ip1=0", "--ratio")
    assert (a.default, a.per_layer) == (0.2, {"conv1": 0.5, "ip1": 0.0})
    assert a.for_group(Group(("x", "conv1"), 2)) == 0.5 and a.for_group(Group(("y",), 2)) == 0.2


@pytest.mark.parametrize("text, message", [
    ("1.5", "out of range"), ("conv1=abc", "not a number"), ("0.1,0.2", "more than one value"),
    ("=0.3", "no layer name"), ("-1", "out of range"), ("nan", "out of range"),
])
def test_bad_amounts_name_the_flag(text, message):
    with pytest.raises(UserError, match=message) as e:
        criteria.parse_amounts(text, "--ratio")
    assert str(e.value).startswith("--ratio")
