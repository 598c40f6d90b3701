"""Caffe's learning rate policies (SGDSolver::GetLearningRate) as one pure function.

Arithmetic follows Caffe's C++ types: sub-expressions Caffe writes in Dtype (float) are done in
float32, pow/exp and the products around them in double (the C library calls), and the result is
stored in float, as Caffe's `Dtype rate` is.
"""
from __future__ import annotations

import logging

import numpy as np

from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2

log = logging.getLogger(__name__)

LR_POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")

_f32 = np.float32


def check_lr_policy(param: caffe_pb2.SolverParameter) -> None:
    """Caffe's checks on the policy's parameters (which Caffe makes at the first update), and the
    schedule's bounds, which Caffe accepts silently: a negative base_lr climbs the loss, a negative
    max_iter trains nothing."""
    if param.base_lr < 0:
        raise UserError(f"base_lr must be >= 0 (got {param.base_lr:g}): a negative rate would increase the loss")
    if param.max_iter < 0:
        raise UserError(f"max_iter must be >= 0 (got {param.max_iter})")
    policy = param.lr_policy
    if policy not in LR_POLICIES:
        raise UserError(f"Unknown learning rate policy: {policy!r} (Caffe knows: {', '.join(LR_POLICIES)})")
    if policy in ("step", "sigmoid") and param.stepsize <= 0:
        raise UserError(f"lr_policy '{policy}' needs stepsize > 0 (got {param.stepsize})")
    if policy in ("step", "exp", "inv", "multistep", "sigmoid") and param.gamma < 0:
        raise UserError(f"lr_policy '{policy}' needs gamma >= 0 (got {param.gamma:g})")
    if policy == "poly" and param.max_iter <= 0:
        # Caffe divides by max_iter without a check and trains with a NaN rate
        raise UserError(f"lr_policy 'poly' needs max_iter > 0 (got {param.max_iter})")


def learning_rate(param: caffe_pb2.SolverParameter, iter: int, current_step: int = 0,
                  announce: bool = True) -> tuple[float, int]:
    """The rate for iteration `iter` and the new `current_step`, as Caffe's GetLearningRate.

    `current_step` is the solver state Caffe keeps: "step" sets it to iter / stepsize; "multistep"
    advances it by at most one per call (when iter reaches the next stepvalue) and logs Caffe's
    "MultiStep Status" line unless `announce` is false. Raises UserError for an unknown policy or
    bad parameters.
    """
    check_lr_policy(param)
    policy = param.lr_policy
    base_lr = np.float64(param.base_lr)
    gamma = np.float64(param.gamma)
    with np.errstate(all="ignore"):
        if policy == "fixed":
            rate = base_lr
        elif policy == "step":
            current_step = iter // param.stepsize
            rate = base_lr * np.power(gamma, np.float64(current_step))
        elif policy == "exp":
            rate = base_lr * np.power(gamma, np.float64(iter))
        elif policy == "inv":
            base = _f32(1) + _f32(param.gamma) * _f32(iter)
            rate = base_lr * np.power(np.float64(base), -np.float64(param.power))
        elif policy == "multistep":
            if current_step < len(param.stepvalue) and iter >= param.stepvalue[current_step]:
                current_step += 1
                if announce:
                    log.info("MultiStep Status: Iteration %d, step = %d", iter, current_step)
            rate = base_lr * np.power(gamma, np.float64(current_step))
        elif policy == "poly":
            frac = _f32(1) - _f32(iter) / _f32(param.max_iter)
            rate = base_lr * np.power(np.float64(frac), np.float64(param.power))
        else:  # sigmoid
            arg = -_f32(param.gamma) * (_f32(iter) - _f32(param.stepsize))
            rate = base_lr * (1.0 / (1.0 + np.exp(np.float64(arg))))
        return float(_f32(rate)), current_step
