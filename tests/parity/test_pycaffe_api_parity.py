"""pycaffe's API, the same script against real pycaffe and `mpicaffe.caffe`.

Each test runs one body with the module as its argument (`real` = BVLC pycaffe, `ours` =
mpicaffe.caffe) and compares what the two return. Tolerances: float32 arithmetic in a different
order (common.RTOL/ATOL, relative 1e-5).
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mpicaffe import caffe as ours
from mpicaffe.errors import UserError
from tests.parity.common import assert_close, pycaffe, write_text

NET = """
name: "small"
force_backward: true
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 3 dim: 2 dim: 8 dim: 8 } } }
layer { name: "label" type: "Input" top: "label" input_param { shape { dim: 3 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 }
                            bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool" top: "ip1"
        inner_product_param { num_output: 6 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "tanh" type: "TanH" bottom: "ip1" top: "t1" }
layer { name: "ip2" type: "InnerProduct" bottom: "t1" top: "ip2"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" loss_weight: 2 }
"""


def _inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((3, 2, 8, 8)).astype(np.float32), np.array([0, 2, 1], np.float32)


def _nets(tmp_path, text: str = NET, phase: str = "TRAIN"):
    """The same net in both, with real Caffe's random weights copied into ours."""
    real = pycaffe()
    tmp_path.mkdir(exist_ok=True)
    path = write_text(tmp_path / "net.prototxt", text)
    a = real.Net(path, getattr(real, phase))
    b = ours.Net(path, getattr(ours, phase))
    for name, blobs in a.params.items():
        for j, blob in enumerate(blobs):
            b.params[name][j].data[...] = blob.data
    return (real, a), (ours, b)


def _backward_segments(caffe, net) -> dict:
    x, y = _inputs()
    net.forward(data=x, label=y)
    out = {}
    net.clear_param_diffs()
    d = net.backward(start="ip2", end="ip1")
    out["ip2..ip1 returned"] = d["pool"].copy()
    out["ip2..ip1 params"] = [p.diff.copy() for n in ("ip1", "ip2") for p in net.params[n]]
    out["conv untouched"] = net.params["conv"][0].diff.copy()
    # deepdream's way: seed a top's diff by hand and go down to the data
    net.clear_param_diffs()
    net.blobs["pool"].diff[...] = net.blobs["pool"].data
    d = net.backward(start="pool")
    out["pool..data"] = d["data"].copy()
    out["pool..data conv"] = [p.diff.copy() for p in net.params["conv"]]
    out["ip1 untouched"] = net.params["ip1"][0].diff.copy()
    net.clear_param_diffs()
    out["cleared"] = [p.diff.copy() for ps in net.params.values() for p in ps]
    d = net.backward(start="loss", end="conv")
    out["loss..conv"] = d["data"].copy()
    out["whole"] = [p.diff.copy() for ps in net.params.values() for p in ps]
    return out


def _compare(a, b, what: str) -> None:
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), what
        for k in a:
            _compare(a[k], b[k], f"{what}: {k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            _compare(x, y, f"{what}[{i}]")
    else:
        assert_close(b, a, what)


def test_backward_from_start_to_end_matches_caffe(tmp_path):
    (real, a), (mine, b) = _nets(tmp_path)
    _compare(_backward_segments(real, a), _backward_segments(mine, b), "backward(start, end)")
    assert not np.any(_backward_segments(mine, b)["conv untouched"])


def test_hdf5_weights_cross_load(tmp_path):
    (real, a), (mine, b) = _nets(tmp_path)
    path = str(tmp_path / "net.prototxt")
    a.save_hdf5(str(tmp_path / "real.h5"))
    b.save_hdf5(str(tmp_path / "ours.h5"))
    a2, b2 = real.Net(path, real.TEST), mine.Net(path, mine.TEST)
    b2.load_hdf5(str(tmp_path / "real.h5"))
    a2.load_hdf5(str(tmp_path / "ours.h5"))
    for name in a.params:
        for j in range(len(a.params[name])):
            np.testing.assert_array_equal(b2.params[name][j].data, a.params[name][j].data)
            np.testing.assert_array_equal(a2.params[name][j].data, a.params[name][j].data)


NO_LOSS = NET.replace('layer { name: "label" type: "Input" top: "label" input_param { shape { dim: 3 } } }', "")
NO_LOSS = NO_LOSS[:NO_LOSS.index('layer { name: "loss"')]


def _all_batches(caffe, net, no_loss):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((7, 2, 8, 8)).astype(np.float32)  # 3 batches, the last padded
    g = rng.standard_normal((7, 3)).astype(np.float32)
    # (pycaffe's forward_backward_all needs output diffs: without, Python 3 stops its generator)
    outs, diffs = no_loss.forward_backward_all(blobs=["t1"], diffs=["pool"], data=x, ip2=g)
    fwd = no_loss.forward_all(blobs=["ip1"], data=x)  # (pycaffe's cannot batch a scalar loss)
    return {"outs": dict(outs), "diffs": dict(diffs), "forward_all": dict(fwd),
            "loss weights": list(net.blob_loss_weights.items()),
            "_blob_loss_weights": list(net._blob_loss_weights),
            "names": (list(net._blob_names), list(net._layer_names), list(net.inputs), list(net.outputs),
                      list(net._inputs), list(net._outputs), dict(net.top_names), dict(net.bottom_names),
                      list(net.layer_dict), [layer.type for layer in net.layers],
                      [(b.num, b.channels, b.height, b.width, b.count) for b in net.blobs.values()])}


def test_forward_backward_all_forward_all_and_structure_match_caffe(tmp_path):
    (real, a), (mine, b) = _nets(tmp_path)
    (_, c), (_, d) = _nets(tmp_path / "no_loss", NO_LOSS)
    ra, ob = _all_batches(real, a, c), _all_batches(mine, b, d)
    assert ra.pop("names") == ob.pop("names")
    assert ra.pop("loss weights") == ob.pop("loss weights")
    assert ra.pop("_blob_loss_weights") == ob.pop("_blob_loss_weights")
    _compare(ra, ob, "batched")


def test_net_reads_binary_weights_whatever_their_name(tmp_path):
    (real, a), (mine, _) = _nets(tmp_path)
    path = str(tmp_path / "net.prototxt")
    a.save(str(tmp_path / "weights.bin"))
    for caffe in (real, mine):
        net = caffe.Net(path, str(tmp_path / "weights.bin"), caffe.TEST)
        np.testing.assert_array_equal(net.params["ip2"][0].data, a.params["ip2"][0].data)


def test_array_to_datum_without_label_matches_pycaffe():
    real = pycaffe()
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    for kwargs in ({}, {"label": 3}):
        want = real.io.array_to_datum(arr, **kwargs)
        got = ours.io.array_to_datum(arr, **kwargs)
        assert got.SerializeToString() == want.SerializeToString()
    farr = arr.astype(np.float32) / 7
    assert ours.io.array_to_datum(farr).SerializeToString() == real.io.array_to_datum(farr).SerializeToString()
    assert not ours.io.array_to_datum(arr).HasField("label")


DEPLOY = """
name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 dim: 10 dim: 10 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 stride: 2 weight_filler { type: "gaussian" std: 0.05 } } }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.05 } } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""


def _deploy(tmp_path):
    (real, a), _ = _nets(tmp_path, DEPLOY, "TEST")
    weights = str(tmp_path / "tiny.caffemodel")
    a.save(weights)
    return real, str(tmp_path / "net.prototxt"), weights


def _classify(caffe, model, weights, images, oversample):
    mean = np.array([0.1, 0.2, 0.3]) * 255
    clf = caffe.Classifier(model, weights, image_dims=(12, 12), mean=mean, raw_scale=255,
                           channel_swap=(2, 1, 0))
    return clf.predict(images, oversample=oversample)


@pytest.mark.parametrize("oversample", [True, False])
def test_classifier_predict_matches_pycaffe(tmp_path, oversample):
    real, model, weights = _deploy(tmp_path)
    rng = np.random.default_rng(2)
    images = [rng.random((12, 12, 3)).astype(np.float32) for _ in range(5)]  # 5: a padded batch
    want = _classify(real, model, weights, images, oversample)
    got = _classify(ours, model, weights, images, oversample)
    assert got.shape == (5, 5)
    assert_close(got, want, f"Classifier.predict(oversample={oversample})")


def test_detector_detect_windows_matches_pycaffe(tmp_path):
    real, model, weights = _deploy(tmp_path)
    rng = np.random.default_rng(3)
    files = []
    for i in range(2):
        files.append(str(tmp_path / f"im{i}.png"))
        Image.fromarray(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(files[-1])
    windows = [(files[0], [np.array([0, 0, 10, 10]), np.array([3, 5, 13, 15])]),
               (files[1], [np.array([6, 10, 16, 20])])]
    results = []
    for caffe in (real, ours):
        det = caffe.Detector(model, weights, mean=np.array([10.0, 20.0, 30.0]), raw_scale=255,
                             channel_swap=(2, 1, 0))
        results.append(det.detect_windows(windows))
    want, got = results
    assert [(d["filename"], list(d["window"])) for d in got] == [(d["filename"], list(d["window"])) for d in want]
    for g, w in zip(got, want):
        assert_close(g["prediction"], w["prediction"], "Detector.detect_windows")


FC_NET = """
name: "fc"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 12 dim: 12 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.2 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc6" type: "InnerProduct" bottom: "pool1" top: "fc6"
        inner_product_param { num_output: 8 weight_filler { type: "gaussian" std: 0.2 } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu6" type: "ReLU" bottom: "fc6" top: "fc6" }
layer { name: "fc7" type: "InnerProduct" bottom: "fc6" top: "fc7"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.2 } } }
"""

CONV_NET = FC_NET.replace("dim: 12 dim: 12", "dim: 16 dim: 16").replace(
    'name: "fc6" type: "InnerProduct" bottom: "pool1" top: "fc6"\n        inner_product_param { num_output: 8',
    'name: "fc6-conv" type: "Convolution" bottom: "pool1" top: "fc6-conv"\n'
    '        convolution_param { num_output: 8 kernel_size: 5').replace(
    'bottom: "fc6" top: "fc6" }', 'bottom: "fc6-conv" top: "fc6-conv" }').replace(
    'name: "fc7" type: "InnerProduct" bottom: "fc6" top: "fc7"\n        inner_product_param { num_output: 5',
    'name: "fc7-conv" type: "Convolution" bottom: "fc6-conv" top: "fc7-conv"\n'
    '        convolution_param { num_output: 5 kernel_size: 1')


def _surgery(caffe, tmp_path, weights):
    """Caffe's net surgery example: cast the fully connected layers to convolutions by copying
    their parameters flat, and run the fully convolutional net on a larger image."""
    fc = caffe.Net(str(tmp_path / "fc.prototxt"), weights, caffe.TEST)
    conv = caffe.Net(str(tmp_path / "conv.prototxt"), weights, caffe.TEST)
    for src, dst in (("fc6", "fc6-conv"), ("fc7", "fc7-conv")):
        conv.params[dst][0].data.flat = fc.params[src][0].data.flat
        conv.params[dst][1].data[...] = fc.params[src][1].data
    image = np.random.default_rng(4).standard_normal((1, 3, 16, 16)).astype(np.float32)
    whole = conv.forward(data=image)["fc7-conv"].copy()
    corner = fc.forward(data=image[:, :, 4:, 2:14])["fc7"].copy()   # the window at output (2, 1)
    return whole, corner


def test_net_surgery_fully_connected_to_convolution(tmp_path):
    real = pycaffe()
    write_text(tmp_path / "fc.prototxt", FC_NET)
    write_text(tmp_path / "conv.prototxt", CONV_NET)
    source = real.Net(str(tmp_path / "fc.prototxt"), real.TEST)
    weights = str(tmp_path / "fc.caffemodel")
    source.save(weights)
    results = {}
    for name, caffe in (("real", real), ("ours", ours)):
        whole, corner = _surgery(caffe, tmp_path, weights)
        assert whole.shape == (1, 5, 3, 3)
        assert_close(whole[0, :, 2, 1], corner[0], f"{name}: conv output at (2, 1) vs the fc net's")
        results[name] = whole
    assert_close(results["ours"], results["real"], "fully convolutional outputs")


def _callback_events(caffe, net) -> dict:
    """What Net.before_forward & co. see: the layer indices in order, and at after_backward(i)
    layer i's parameter diffs."""
    events, diffs = [], []
    layers = list(net.layers)

    def after_backward(i):
        events.append(("after_backward", i))
        diffs.append([b.diff.copy() for b in layers[i].blobs])

    net.before_forward(lambda i: events.append(("before_forward", i)))
    net.after_forward(lambda i: events.append(("after_forward", i)))
    net.before_backward(lambda i: events.append(("before_backward", i)))
    net.after_backward(after_backward)
    x, y = _inputs()
    net.forward(data=x, label=y)
    net.clear_param_diffs()
    net.backward()
    net.backward(start="ip2", end="ip1")
    return {"events": events, "diffs": diffs, "data diff": net.blobs["data"].diff.copy()}


def test_layer_callbacks_match_caffe(tmp_path):
    (real, a), (mine, b) = _nets(tmp_path)
    ra, ob = _callback_events(real, a), _callback_events(mine, b)
    assert ob.pop("events") == ra.pop("events")
    _compare(ra, ob, "callbacks")


SOLVER = """net: "{net}"
base_lr: 0.1
lr_policy: "multistep"
stepvalue: 1
stepvalue: 3
gamma: 0.5
momentum: 0.9
max_iter: 10
display: 0
snapshot_after_train: false
random_seed: 1
"""


def _solver_run(caffe, tmp_path, weights: str) -> dict:
    """Steps of a solver with layer callbacks on its net, and pycaffe's SGDSolver.lr read before
    each step (the rate that step's update uses)."""
    solver = caffe.SGDSolver(str(tmp_path / "solver.prototxt"))
    solver.net.copy_from(weights)
    x, y = _inputs()
    solver.net.blobs["data"].data[...] = x
    solver.net.blobs["label"].data[...] = y
    events, rates = [], []
    solver.net.before_forward(lambda i: events.append(("before_forward", i)))
    solver.net.after_backward(lambda i: events.append(("after_backward", i)))
    for _ in range(4):
        rates.append((solver.iter, solver.lr))
        solver.step(1)
    return {"events": events, "rates": rates, "weights": [p.data.copy() for ps in solver.net.params.values()
                                                          for p in ps]}


def test_solver_lr_and_callbacks_during_step_match_caffe(tmp_path):
    real = pycaffe()
    net = write_text(tmp_path / "net.prototxt", NET)
    write_text(tmp_path / "solver.prototxt", SOLVER.format(net=net))
    weights = str(tmp_path / "init.caffemodel")
    real.Net(net, real.TRAIN).save(weights)
    ra, ob = _solver_run(real, tmp_path, weights), _solver_run(ours, tmp_path, weights)
    assert ob.pop("events") == ra.pop("events")
    assert [it for it, _ in ob["rates"]] == [0, 1, 2, 3]
    _compare(ra, ob, "solver")


def test_layers_without_parameters_may_share_a_name_as_in_caffe(tmp_path):
    # two ReLU layers called "relu" (hand-written nets have them); Caffe builds and runs the net
    text = NET.replace('name: "tanh" type: "TanH"', 'name: "relu" type: "TanH"')
    (_, a), (_, b) = _nets(tmp_path, text)
    assert list(b._layer_names) == list(a._layer_names) and list(a._layer_names).count("relu") == 2
    x, y = _inputs()
    for net in (a, b):
        net.forward(data=x, label=y)
        net.backward()
    assert_close(b.blobs["loss"].data, a.blobs["loss"].data, "loss")
    assert_close(b.blobs["data"].diff, a.blobs["data"].diff, "data diff")
    assert list(b.top_names.items()) == list(a.top_names.items())


BN_NET = """
name: "bn"
force_backward: true
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 dim: 8 dim: 8 } } }
layer { name: "label" type: "Input" top: "label" input_param { shape { dim: 4 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "conv2" type: "Convolution" bottom: "conv" top: "conv2"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "twice" type: "Eltwise" bottom: "conv2" bottom: "conv2" top: "s" }
layer { name: "ip" type: "InnerProduct" bottom: "s" top: "ip"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "ipb" type: "InnerProduct" bottom: "conv2" top: "ipb"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "sum" type: "Eltwise" bottom: "ip" bottom: "ipb" top: "out" }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "out" bottom: "label" top: "loss" }
"""


def _layer_by_layer(caffe, net) -> dict:
    """Two training passes with a backward callback (backward then runs layer by layer), then
    backward(start=, end=) over the whole net: BatchNorm's statistics, and a blob (conv2, not
    computed in place) given twice to one layer and once to another (Caffe splits it in three;
    its diff is the sum)."""
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((4, 3, 8, 8)).astype(np.float32), np.array([0, 2, 1, 1], np.float32)
    net.after_backward(lambda i: None)
    out = {}
    for step in range(2):
        net.forward(data=x, label=y)
        net.clear_param_diffs()
        net.backward()
        out[f"pass {step}"] = [p.diff.copy() for ps in net.params.values() for p in ps]
    # (a forward first: Caffe's in-place Scale keeps its bottom's data in a buffer its backward
    # overwrites, so a second backward of one forward gives Caffe another gamma diff)
    net.forward(data=x, label=y)
    net.clear_param_diffs()
    out["loss..conv data"] = net.backward(start="loss", end="conv")["data"].copy()
    out["loss..conv params"] = [p.diff.copy() for ps in net.params.values() for p in ps]
    return out


def test_layer_by_layer_backward_matches_caffe_on_batchnorm_and_a_blob_read_three_times(tmp_path):
    (real, a), (mine, b) = _nets(tmp_path, BN_NET)
    _compare(_layer_by_layer(real, a), _layer_by_layer(mine, b), "layer by layer")


def _forward_from_a_layer(caffe, net) -> dict:
    """forward(), a weight changed, forward(start='ip1') and backward(): layers before ip1 keep
    their data (Caffe does not run them again), the loss is the new one; then, after that
    backward, once more from ip1, backpropagated down to ip1 only."""
    x, y = _inputs()
    net.forward(data=x, label=y)
    net.params["ip1"][0].data[...] *= 1.1
    out = {"loss": float(net.forward(start="ip1")["loss"])}
    net.clear_param_diffs()
    net.backward()
    out["whole"] = [p.diff.copy() for ps in net.params.values() for p in ps] + [net.blobs["data"].diff.copy()]
    net.params["ip2"][0].data[...] *= 0.9
    net.forward(start="ip1")
    net.clear_param_diffs()
    out["down to ip1"] = net.backward(end="ip1")["pool"].copy()
    out["down to ip1 params"] = [p.diff.copy() for n in ("ip1", "ip2") for p in net.params[n]]
    return out


def test_backward_after_a_forward_from_a_later_layer_matches_caffe(tmp_path):
    (real, a), (mine, b) = _nets(tmp_path)
    _compare(_forward_from_a_layer(real, a), _forward_from_a_layer(mine, b), "forward(start=)")
    # a whole backward there needs the graph of the layers before ip1, which the last backward
    # freed: a clear error (Caffe would backpropagate the layers' stored data)
    b.forward(start="ip1")
    with pytest.raises(UserError, match="stop the backward where that forward started"):
        b.backward()
