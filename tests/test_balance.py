"""Splitting a fixed global batch by measured speed (mpicaffe.balance), and which runs may balance."""
import pytest

from mpicaffe.balance import split_by_speed
from mpicaffe.errors import UserError
from mpicaffe.trainer import TrainConfig, _check_heterogeneous


def test_split_is_proportional_to_speed_and_sums_to_the_global_batch():
    assert split_by_speed(32, [1.0, 1.0]) == [16, 16]
    assert split_by_speed(30, [1.0, 2.0]) == [20, 10]      # rank 1 takes twice as long per sample
    assert split_by_speed(10, [1.0, 1.0, 1.0]) == [4, 3, 3]  # leftover to the lower rank on ties
    split = split_by_speed(33, [0.3, 1.1, 0.7])
    assert sum(split) == 33 and split[0] > split[2] > split[1]


def test_every_rank_keeps_at_least_one_sample():
    assert split_by_speed(4, [1.0, 1000.0, 1000.0]) == [2, 1, 1]
    with pytest.raises(UserError, match="global batch of 2 over 3 ranks"):
        split_by_speed(2, [1.0, 1.0, 1.0])


def test_balance_and_devices_need_the_engine_and_a_fixed_set_of_ranks():
    with pytest.raises(UserError, match="--balance auto needs --backend engine"):
        _check_heterogeneous(TrainConfig(solver="s", balance="auto"), "caffe")
    with pytest.raises(UserError, match="--devices cpu: the Caffe backend"):
        _check_heterogeneous(TrainConfig(solver="s", devices="cpu"), "caffe")
    with pytest.raises(UserError, match="ulfm cannot be combined"):
        _check_heterogeneous(TrainConfig(solver="s", balance="auto", fault_tolerance="ulfm"), "engine")
    with pytest.raises(UserError, match="--balance-iters 0"):
        _check_heterogeneous(TrainConfig(solver="s", balance="auto", balance_iters=0), "engine")
    with pytest.raises(UserError, match="give --gpu or --devices, not both"):
        _check_heterogeneous(TrainConfig(solver="s", gpu="0", devices="cpu"), "engine")
    _check_heterogeneous(TrainConfig(solver="s", balance="auto", devices="cpu"), "engine")
