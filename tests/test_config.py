"""The training options and their checks against each other (mpicaffe.config.TrainConfig.check)."""
import dataclasses

import pytest

from mpicaffe.config import TrainConfig
from mpicaffe.errors import UserError
from mpicaffe.prune.apoptosis import ApoptosisConfig

REFUSED = [
    # (options, backend, ranks, message)
    ({"weights": "w.caffemodel", "snapshot": "s.solverstate"}, "engine", 1, "but not both"),
    ({"global_batch": 3}, "engine", 4, "--global-batch 3 is smaller than the number of ranks \\(4\\)"),
    ({"gpu": "0", "devices": "cpu"}, "engine", 1, "give --gpu or --devices, not both"),
    ({"devices": "cpu"}, "caffe", 1, "--devices cpu: the Caffe backend"),
    ({"gpu": "0"}, "caffe", 1, "--gpu 0: the Caffe backend runs Caffe in CPU mode"),
    ({"balance": "auto"}, "caffe", 2, "--balance auto needs --backend engine"),
    ({"fault_tolerance": "ulfm"}, "caffe", 2, "--fault-tolerance ulfm needs the built-in engine"),
    ({"balance": "auto", "fault_tolerance": "ulfm"}, "engine", 2, "ulfm cannot be combined"),
    ({"balance": "auto", "balance_iters": 0}, "engine", 2, "--balance-iters 0"),
    ({"apoptosis": ApoptosisConfig(every=0)}, "engine", 1, "--prune-every must be >= 1"),
    ({"apoptosis": ApoptosisConfig(every=5), "fault_tolerance": "ulfm"}, "engine", 2,
     "--prune-every cannot be combined with --fault-tolerance"),
]


@pytest.mark.parametrize("options,backend,ranks,message", REFUSED)
def test_flags_that_cannot_go_together_are_refused_naming_them(options, backend, ranks, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(solver="s.prototxt", **options).check(backend, ranks)


@pytest.mark.parametrize("options,backend,ranks", [
    ({}, "caffe", 4),
    ({"global_batch": 4}, "engine", 4),
    ({"balance": "auto", "devices": "cpu"}, "engine", 2),
    ({"fault_tolerance": "ulfm", "global_batch": 64}, "engine", 3),
    ({"apoptosis": ApoptosisConfig(every=5), "weights": "w.caffemodel"}, "caffe", 2),
])
def test_combinations_that_work_pass(options, backend, ranks):
    TrainConfig(solver="s.prototxt", **options).check(backend, ranks)


def test_the_configuration_cannot_change_once_built():
    cfg = TrainConfig(solver="s.prototxt")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.snapshot = "other.solverstate"
