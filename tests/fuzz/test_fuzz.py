"""The fuzz tier: generated bad inputs (hypothesis) for every file a user hands mpicaffe. Each
must end in a clear error (UserError, which the CLI prints as one located line) or a correct
result: never another exception, a signal death or a hang.

Inputs are mutations of valid files (a net, a solver, a .caffemodel, a .solverstate, an LMDB
Datum) and arbitrary JSON for the snapshot manifest. Numbers the mutations insert stay small, so
that a generated net cannot ask for more memory than the machine has (Caffe aborts on that as
well). Runs are derandomized (the same examples every run: CI does not flake) and the examples
per property are bounded, for a budget of about a minute on 2 cores.
"""
from __future__ import annotations

import json
import os
import re
import tempfile

import numpy as np
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mpicaffe import prototxt, snapshot
from mpicaffe.backends.engine import snapshot_io
from mpicaffe.backends.engine.layers.data import _decode_datum, _parse_record
from mpicaffe.backends.engine.net import Net
from mpicaffe.backends.engine.solver import get_solver
from mpicaffe.data import lmdb_io
from mpicaffe.data.transform import DataTransformer
from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

NET = """name: "fuzz"
layer { name: "data" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 2 dim: 1 dim: 12 dim: 12 } shape { dim: 2 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 stride: 1 pad: 1 weight_filler { type: "xavier" } } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "drop" type: "Dropout" bottom: "pool" top: "pool" dropout_param { dropout_ratio: 0.5 } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip" inner_product_param { num_output: 3 } }
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc" include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""
SOLVER = """base_lr: 0.01
momentum: 0.9
weight_decay: 0.0005
lr_policy: "step"
gamma: 0.1
stepsize: 10
max_iter: 4
type: "SGD"
iter_size: 1
average_loss: 1
"""
# what a mutation may put in: the files' own words and punctuation, and small or odd numbers
WORDS = sorted(set(NET.replace("{", " ").replace("}", " ").replace('"', " ").split()) |
               set(SOLVER.replace('"', " ").split()) |
               {"{", "}", '"', ":", "-1", "0", "2", "7", "1e-3", "nan", "inf", "-inf", "3.5", "TRAIN", "TEST", "AVE",
                "Adam", "Nesterov", "fixed", "poly", "multistep", "bottom:", "top:", "type:", "layer", "#", "\n"})


def mutated(text: str):
    """Strategy: `text` with up to 4 edits (delete, replace or insert a token or a span)."""
    tokens = text.replace("{", " { ").replace("}", " } ").split(" ")

    @st.composite
    def edit(draw):
        out = list(tokens)
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, max(0, len(out) - 1)))
            kind = draw(st.sampled_from(["delete", "replace", "insert", "span"]))
            if kind == "delete" and out:
                del out[i]
            elif kind == "replace" and out:
                out[i] = draw(st.sampled_from(WORDS))
            elif kind == "insert":
                out.insert(i, draw(st.sampled_from(WORDS)))
            else:
                j = draw(st.integers(i, min(len(out), i + 12)))
                out[i:j] = out[i:j] * draw(st.integers(0, 2))  # a span dropped or doubled
        return " ".join(out)

    return edit()


VALUES = ["-1", "0", "1", "2", "3", "7", "64", "0.5", "-0.5", "nan", "inf", "true", "false", "MAX", "AVE", "TRAIN",
          "TEST", '"data"', '"label"', '"conv"', '"pool"', '"ip"', '"loss"', '"nowhere"', '"xavier"', '"gaussian"',
          '"Convolution"', '"Pooling"', '"InnerProduct"', '"ReLU"', '"Eltwise"', '"Concat"', '"Slice"', '"Flatten"',
          '"Reshape"', '"Softmax"', '"EuclideanLoss"', '"Deconvolution"', '"LRN"', '"Crop"', '"Python"', '""']


def value_mutated(text: str):
    """Strategy: `text` with up to 4 field values replaced (`kernel_size: 3` -> `kernel_size: -1`,
    `bottom: "conv"` -> `bottom: "pool"`, a type by another): the structure stays, so most
    results parse and reach the layers' own checks."""
    spans = [m.span(2) for m in re.finditer(r'(\w+): ("[^"]*"|[-\w.]+)', text)]

    @st.composite
    def edit(draw):
        chosen = sorted({draw(st.integers(0, len(spans) - 1)) for _ in range(draw(st.integers(1, 4)))}, reverse=True)
        out = text
        for i in chosen:
            lo, hi = spans[i]
            out = out[:lo] + draw(st.sampled_from(VALUES)) + out[hi:]
        return out

    return edit()


def _build_and_run(net: caffe_pb2.NetParameter) -> None:
    for phase in (caffe_pb2.TRAIN, caffe_pb2.TEST):
        built = Net(prototxt.net_for_phase(net, phase), source="fuzz.prototxt")
        for blob in built.inputs:
            t = built.blobs[blob].tensor
            with torch.no_grad():
                t.copy_(torch.randint(0, 3, t.shape).to(t.dtype))
        built.forward()
        if phase == caffe_pb2.TRAIN:
            built.backward()


@FUZZ
@given(mutated(NET) | value_mutated(NET))
@example(NET.replace('type: "xavier"', 'type: "label"'))  # found by this test: the filler's error named no file
def test_a_mutated_net_is_built_and_run_or_refused_clearly(text):
    try:
        net = prototxt.parse_text(text, caffe_pb2.NetParameter(), "fuzz.prototxt")
        _build_and_run(net)
    except UserError as e:
        assert "fuzz.prototxt" in str(e), f"an error that does not name the file: {e}"


@FUZZ
@given(mutated(SOLVER) | value_mutated(SOLVER))
def test_a_mutated_solver_trains_or_is_refused_clearly(text):
    try:
        param = prototxt.parse_text(text, caffe_pb2.SolverParameter(), "fuzz_solver.prototxt")
        param.net_param.CopyFrom(prototxt.parse_text(NET, caffe_pb2.NetParameter()))
        param.ClearField("snapshot")
        param.snapshot_after_train = False
        param.max_iter = min(max(param.max_iter, 0), 4)
        param.ClearField("test_iter")
        get_solver(param, "fuzz_solver.prototxt").step(2)
    except UserError:
        pass


def _valid_files(folder: str) -> tuple[Net, bytes, bytes, caffe_pb2.SolverParameter]:
    param = prototxt.parse_text(SOLVER, caffe_pb2.SolverParameter())
    param.net_param.CopyFrom(prototxt.parse_text(NET, caffe_pb2.NetParameter()))
    param.snapshot_prefix = os.path.join(folder, "valid")
    solver = get_solver(param)
    solver.step(1)
    weights, state = solver.snapshot()
    # the state names its weights by the file name alone (found next to it), not by the random
    # folder's path: the mutations, derandomized, must get the same bytes every run
    with open(weights, "rb") as f, open(state, "rb") as g:
        data = caffe_pb2.SolverState.FromString(g.read())
        data.learned_net = os.path.basename(weights)
        return solver, f.read(), data.SerializeToString(), param


_FOLDER = tempfile.mkdtemp(prefix="mpicaffe-fuzz-")
_SOLVER, _WEIGHTS, _STATE, _PARAM = _valid_files(_FOLDER)


def bytes_mutated(data: bytes):
    """Strategy: `data` truncated, with bytes flipped, or with random bytes inserted."""
    @st.composite
    def edit(draw):
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 3))):
            kind = draw(st.sampled_from(["truncate", "flip", "insert"]))
            i = draw(st.integers(0, max(0, len(out) - 1)))
            if kind == "truncate":
                del out[i:]
            elif kind == "flip" and out:
                out[i] ^= draw(st.integers(1, 255))
            else:
                out[i:i] = draw(st.binary(min_size=1, max_size=8))
        return bytes(out)

    return edit()


@FUZZ
@given(bytes_mutated(_WEIGHTS))
def test_a_corrupt_caffemodel_loads_or_is_refused_clearly(data):
    path = os.path.join(_FOLDER, "fuzz.caffemodel")
    with open(path, "wb") as f:
        f.write(data)
    try:
        snapshot_io.load_weights(_SOLVER.net, path)
    except UserError:
        pass


@FUZZ
@given(bytes_mutated(_STATE))
@example(_STATE.replace(b"valid_iter_1", b"valid\xffiter_1"))  # found by this test: a learned_net not UTF-8
def test_a_corrupt_solverstate_restores_or_is_refused_clearly(data):
    path = os.path.join(_FOLDER, "fuzz.solverstate")
    with open(path, "wb") as f:
        f.write(data)
    try:
        _SOLVER.restore(path)
    except UserError:
        pass


JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 10**12) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
                    max_leaves=20)
RECORD = st.fixed_dictionaries({"iteration": JSON | st.integers(0, 100), "caffemodel": JSON | st.just("a.caffemodel"),
                                "solverstate": JSON | st.just("a.solverstate"), "sha256": JSON,
                                "ranks": JSON | st.integers(1, 4), "global_batch": JSON | st.integers(1, 64),
                                "written": JSON})


@FUZZ
@given(JSON | st.fixed_dictionaries({"format": st.just(snapshot.MANIFEST_FORMAT), "snapshots": st.lists(RECORD, max_size=3)}))
def test_a_hand_edited_manifest_reads_or_is_refused_clearly(value):
    prefix = os.path.join(_FOLDER, "fuzz")
    with open(snapshot.manifest_path(prefix), "w") as f:
        json.dump(value, f)
    try:
        for record in snapshot.read_manifest(prefix):
            snapshot.verify(prefix, record)
        snapshot.latest_verified_snapshot(prefix)
    except UserError:
        pass


_DATUM = lmdb_io.array_to_datum(np.arange(3 * 8 * 8, dtype=np.uint8).reshape(3, 8, 8), 1).SerializeToString()
_TRANSFORM = prototxt.parse_text("scale: 0.00390625 mirror: true crop_size: 6 mean_value: 100",
                                 caffe_pb2.TransformationParameter())


@FUZZ
@given(bytes_mutated(_DATUM))
def test_a_corrupt_lmdb_record_decodes_or_is_refused_clearly(value):
    transformer = DataTransformer(_TRANSFORM, caffe_pb2.TRAIN, source="fuzz_lmdb")
    try:
        datum = _parse_record("fuzz_lmdb", (b"00000000", value))
        array = _decode_datum("fuzz_lmdb", transformer, b"00000000", datum)
        transformer.transform(array[None])
    except UserError:
        pass
