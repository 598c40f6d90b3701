"""`mpicaffe prune` end to end on real files (a small net with Input layers, l1 criterion)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mpicaffe import cli, prototxt
from mpicaffe.proto import caffe_pb2
from mpicaffe.prune.model import build_net
from tests.prune import nets


@pytest.fixture
def files(tmp_path):
    torch.manual_seed(0)
    param = nets.parse()
    net = build_net(param, caffe_pb2.TRAIN, "<branchy>", None)
    nets.randomize_batchnorm(net)
    model, weights = tmp_path / "branchy.prototxt", tmp_path / "branchy.caffemodel"
    model.write_text(prototxt.to_text(param))
    weights.write_bytes(net.to_proto().SerializeToString())
    return tmp_path, str(model), str(weights)


def test_prune_writes_loadable_files_and_a_report(files, capsys):
    tmp, model, weights = files
    out = tmp / "out"
    assert cli.main(["prune", "--model", model, "--weights", weights, "--out", str(out), "--ratio", "0.5",
                     "--layers", "conv1,conv3"]) == 0
    text = capsys.readouterr().out
    assert "Left whole: convg: grouped convolution (group 3): left alone" in text
    report = json.loads((out / "prune_report.json").read_text())
    layers = {r["name"]: r for r in report["layers"]}
    assert layers["conv1"]["num_output"] == [8, 4] and layers["conv3"]["num_output"] == [10, 5]
    assert layers["conv2a"]["num_output"] == [] and layers["conv2a"]["params"][1] < layers["conv2a"]["params"][0]
    assert report["totals"]["params_after"] < report["totals"]["params_before"]
    pruned = build_net(prototxt.read_net(str(out / "branchy.prototxt")), caffe_pb2.TEST, "p",
                       str(out / "branchy.caffemodel"))
    assert tuple(pruned.layer("conv3s").blobs[0].shape) == (5, 10, 1, 1)
    pruned.blobs["data"].data[...] = nets.inputs()
    with torch.no_grad():
        pruned.forward()
    assert np.isfinite(pruned.blobs["ip2"].data).all()


@pytest.mark.parametrize("extra, message", [
    (["--ratio", "1.5"], "--ratio: 1.5 is out of range"),
    (["--ratio", "0.5", "--layers", "nosuch"], "--layers: layer 'nosuch' is not in the net"),
    (["--ratio", "0.5", "--layers", "relu1"], "layer 'relu1' is not a Convolution or InnerProduct layer"),
    (["--ratio", "convg=0.5"], "--ratio: layer 'convg' cannot be pruned: grouped convolution"),
    (["--ratio", "0.5", "--criterion", "apoptosis"], "its TEST phase reads inputs (data)"),
    (["--ratio", "0.5", "--finetune-iters", "5"], "--finetune-iters needs --solver"),
    (["--ratio", "0.5", "--solverstate", "missing.solverstate"], "missing.solverstate: solver state file not found"),
])
def test_bad_requests_get_one_clear_error(files, capsys, extra, message):
    tmp, model, weights = files
    assert cli.main(["prune", "--model", model, "--weights", weights, "--out", str(tmp / "o"), *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("mpicaffe prune: error:") and message in err, err


def test_refuses_to_overwrite_its_inputs(files, capsys):
    tmp, model, weights = files
    assert cli.main(["prune", "--model", model, "--weights", weights, "--out", str(tmp), "--ratio", "0.1"]) == 1
    assert "would overwrite the input" in capsys.readouterr().err
