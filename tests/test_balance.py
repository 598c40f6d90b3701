"""Splitting a fixed global batch by measured speed (mpicaffe.balance), and which runs may balance."""
import pytest

from mpicaffe.balance import split_by_speed
from mpicaffe.errors import UserError


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
