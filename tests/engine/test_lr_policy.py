"""Caffe's lr_policy formulas (SGDSolver::GetLearningRate) against hand-computed values."""
import logging
import math

import numpy as np
import pytest

from mpicaffe import prototxt
from mpicaffe.backends.engine.lr_policy import learning_rate
from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2


def sp(text: str) -> caffe_pb2.SolverParameter:
    return prototxt.parse_text(text, caffe_pb2.SolverParameter(), "<lr test>")


def rates(param, iters, current_step=0):
    out = []
    for it in iters:
        rate, current_step = learning_rate(param, it, current_step)
        out.append((rate, current_step))
    return out


def test_fixed():
    assert rates(sp('base_lr: 0.01 lr_policy: "fixed"'), [0, 1, 1000]) == [(np.float32(0.01), 0)] * 3


def test_step_sets_current_step_to_iter_over_stepsize():
    got = rates(sp('base_lr: 0.01 lr_policy: "step" gamma: 0.1 stepsize: 3'), range(8))
    want_lr = [0.01] * 3 + [0.001] * 3 + [0.0001] * 2
    assert [s for _, s in got] == [0, 0, 0, 1, 1, 1, 2, 2]
    np.testing.assert_allclose([r for r, _ in got], want_lr, rtol=1e-6)


def test_exp():
    got = rates(sp('base_lr: 0.1 lr_policy: "exp" gamma: 0.9'), [0, 1, 2, 10])
    np.testing.assert_allclose([r for r, _ in got], [0.1, 0.09, 0.081, 0.1 * 0.9 ** 10], rtol=1e-6)


def test_inv():
    p = sp('base_lr: 0.01 lr_policy: "inv" gamma: 0.0001 power: 0.75')
    got = [learning_rate(p, it)[0] for it in (0, 100, 10000)]
    np.testing.assert_allclose(got, [0.01, 0.01 * 1.01 ** -0.75, 0.01 * 2 ** -0.75], rtol=1e-6)


def test_multistep_advances_at_each_stepvalue_with_caffes_log_line(caplog):
    p = sp('base_lr: 1 lr_policy: "multistep" gamma: 0.5 stepvalue: 2 stepvalue: 5 stepvalue: 6')
    with caplog.at_level(logging.INFO, logger="mpicaffe"):
        got = rates(p, range(9))
    assert [s for _, s in got] == [0, 0, 1, 1, 1, 2, 3, 3, 3]
    assert [r for r, _ in got] == [1, 1, 0.5, 0.5, 0.5, 0.25, 0.125, 0.125, 0.125]
    assert caplog.messages == ["MultiStep Status: Iteration 2, step = 1", "MultiStep Status: Iteration 5, step = 2",
                               "MultiStep Status: Iteration 6, step = 3"]


def test_multistep_moves_at_most_one_step_per_call():
    # Caffe's `if`, not `while`: a late start catches up one step per iteration
    p = sp('base_lr: 1 lr_policy: "multistep" gamma: 0.5 stepvalue: 2 stepvalue: 5')
    assert rates(p, [10, 11, 12]) == [(0.5, 1), (0.25, 2), (0.25, 2)]


def test_poly_reaches_zero_at_max_iter():
    p = sp('base_lr: 0.1 lr_policy: "poly" power: 2 max_iter: 10')
    got = [learning_rate(p, it)[0] for it in (0, 5, 9, 10)]
    np.testing.assert_allclose(got, [0.1, 0.025, 0.001, 0.0], rtol=1e-6, atol=0)


def test_sigmoid_is_half_base_lr_at_stepsize():
    p = sp('base_lr: 0.1 lr_policy: "sigmoid" gamma: 0.5 stepsize: 4')
    got = [learning_rate(p, it)[0] for it in (0, 4, 8)]
    np.testing.assert_allclose(got, [0.1 / (1 + math.e ** 2), 0.05, 0.1 / (1 + math.e ** -2)], rtol=1e-6)


def test_sigmoid_with_negative_gamma_rejected_and_huge_exponent_gives_zero():
    with pytest.raises(UserError, match="gamma >= 0"):
        learning_rate(sp('base_lr: 0.1 lr_policy: "sigmoid" gamma: -1 stepsize: 4'), 0)
    assert learning_rate(sp('base_lr: 0.1 lr_policy: "sigmoid" gamma: 100 stepsize: 100'), 0)[0] == 0.0


def test_rate_is_stored_in_float():
    for text in ('lr_policy: "exp" gamma: 0.9', 'lr_policy: "inv" gamma: 0.001 power: 0.75',
                 'lr_policy: "sigmoid" gamma: 0.3 stepsize: 3', 'lr_policy: "poly" power: 0.5 max_iter: 7'):
        rate, _ = learning_rate(sp("base_lr: 0.1 " + text), 3)
        assert rate == float(np.float32(rate)), text


def test_exp_overflow_is_inf_not_an_exception():
    assert learning_rate(sp('base_lr: 0.1 lr_policy: "exp" gamma: 10'), 1000)[0] == math.inf


@pytest.mark.parametrize("text, message", [
    ('lr_policy: "cosine"', "Unknown learning rate policy: 'cosine'"),
    ("", "Unknown learning rate policy: ''"),
    ('lr_policy: "step" gamma: 0.1', "lr_policy 'step' needs stepsize > 0"),
    ('lr_policy: "step" stepsize: 2 gamma: -0.1', "lr_policy 'step' needs gamma >= 0"),
    ('lr_policy: "exp" gamma: -1', "lr_policy 'exp' needs gamma >= 0"),
    ('lr_policy: "sigmoid" gamma: 0.1', "lr_policy 'sigmoid' needs stepsize > 0"),
    ('lr_policy: "poly" power: 1', "lr_policy 'poly' needs max_iter > 0"),
])
def test_bad_policies_are_user_errors(text, message):
    with pytest.raises(UserError, match=message):
        learning_rate(sp("base_lr: 0.1 " + text), 0)


@pytest.mark.parametrize("text, message", [
    ('base_lr: -0.01 lr_policy: "fixed"', "base_lr must be >= 0 \\(got -0.01\\)"),
    ('base_lr: 0.01 lr_policy: "fixed" max_iter: -5', "max_iter must be >= 0 \\(got -5\\)"),
])
def test_a_negative_rate_or_iteration_count_is_refused(text, message):
    # real Caffe runs both silently: gradient ascent, or no training at all
    with pytest.raises(UserError, match=message):
        learning_rate(sp(text), 0)
