"""The engine refuses what BVLC Caffe's CHECKs refuse (net.cpp's Net::Init and AppendParam, the
layers' LayerSetUp and Reshape), with a UserError naming the file, the layer and the field, and
accepts what they accept.

Each net is tiny (Input layers). Real Caffe runs every net in one subprocess that imports pycaffe
once and forks a child per net, so a CHECK that aborts the child is one case, not the whole run.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from mpicaffe import prototxt
from mpicaffe.backends.engine.net import Net
from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2
from tests.real_caffe import import_pycaffe


def _input(name: str = "x", *dims: int) -> str:
    dims = dims or (2, 3, 8, 8)
    shape = " ".join(f"dim: {d}" for d in dims)
    return f'layer {{ name: "{name}" type: "Input" top: "{name}" input_param {{ shape {{ {shape} }} }} }}\n'


def _layer(name: str, kind: str, bottoms=("x",), tops=("y",), extra: str = "") -> str:
    wires = " ".join([f'bottom: "{b}"' for b in bottoms] + [f'top: "{t}"' for t in tops])
    return f'layer {{ name: "{name}" type: "{kind}" {wires} {extra} }}\n'


X = _input()


def _ip(name: str, top: str, spec: str) -> str:
    return _layer(name, "InnerProduct", tops=(top,), extra=f'param {{ name: "w" {spec} }} '
                  "inner_product_param { num_output: 4 }")


# (case, net, layer the message must name, regex of the field or rule it must name)
# fixed here (the engine built these nets, or failed otherwise, before):
FIXED = [
    # Net::Init: "Too many params specified for layer"
    ("too_many_params_inner_product", X + _layer("ip", "InnerProduct", extra="param { lr_mult: 1 } param { lr_mult: 2 } "
                                                 "inner_product_param { num_output: 4 bias_term: false }"),
     "ip", r"too many params.*2 param .*1 parameter blob"),
    ("too_many_params_relu", X + _layer("relu", "ReLU", extra="param { lr_mult: 1 }"), "relu", r"too many params"),
    ("too_many_params_convolution", X + _layer("conv", "Convolution", extra="param {} param {} param {} "
                                               "convolution_param { num_output: 4 kernel_size: 3 }"),
     "conv", r"too many params.*3 param .*2 parameter blob"),
    ("too_many_params_batch_norm", X + _layer("bn", "BatchNorm", extra="param { lr_mult: 0 } " * 4),
     "bn", r"too many params.*4 param .*3 parameter blob"),
    ("too_many_params_input", ('layer { name: "x" type: "Input" top: "x" param { lr_mult: 0 } '
                               "input_param { shape { dim: 2 } } }\n"), "x", r"too many params"),
    # ReshapeLayer::LayerSetUp: no in-place computation
    ("reshape_in_place", X + _layer("r", "Reshape", tops=("x",), extra="reshape_param { shape { dim: 0 dim: -1 } }"),
     "r", r"in-place"),
    # LossLayer::LayerSetUp adds one loss_weight, too few for two tops
    ("loss_two_tops_without_loss_weight", _input("x", 2, 3) + _input("label", 2) + _input("H", 3, 3)
     + _layer("loss", "InfogainLoss", bottoms=("x", "label", "H"), tops=("l", "p")),
     "loss", r"loss_weight must be given once per top"),
    # SoftmaxWithLoss: its inner Softmax takes every top's loss_weight
    ("softmax_loss_two_tops", _input("x", 2, 3) + _input("label", 2)
     + _layer("loss", "SoftmaxWithLoss", bottoms=("x", "label"), tops=("l", "p"), extra="loss_weight: 1 loss_weight: 0"),
     "loss", r"SoftmaxWithLoss layer with 2 tops"),
]

# refused before (kept here so that they stay refused)
ALREADY = [
    ("conv_group_channels", X + _layer("conv", "Convolution", extra="convolution_param { num_output: 4 kernel_size: 3 group: 2 }"),
     "conv", r"group"),
    ("conv_num_output_group", _input("x", 2, 4, 8, 8) + _layer("conv", "Convolution", extra="convolution_param { "
                                                               "num_output: 3 kernel_size: 3 group: 2 }"),
     "conv", r"num_output 3 .*group 2"),
    ("conv_kernel_size_three_times", X + _layer("conv", "Convolution", extra="convolution_param { num_output: 4 "
                                                "kernel_size: 3 kernel_size: 3 kernel_size: 3 }"),
     "conv", r"kernel_size"),
    ("conv_stride_zero", X + _layer("conv", "Convolution", extra="convolution_param { num_output: 4 kernel_size: 3 stride: 0 }"),
     "conv", r"stride"),
    ("conv_kernel_h_3d", _input("x", 2, 3, 4, 4, 4) + _layer("conv", "Convolution", extra="convolution_param { "
                                                             "num_output: 4 kernel_h: 3 kernel_w: 3 }"),
     "conv", r"kernel_h"),
    ("pooling_pad_not_below_kernel", X + _layer("p", "Pooling", extra="pooling_param { kernel_size: 2 pad: 2 }"),
     "p", r"pad"),
    ("pooling_global_with_kernel", X + _layer("p", "Pooling", extra="pooling_param { global_pooling: true kernel_size: 2 }"),
     "p", r"global_pooling"),
    ("pooling_kernel_h_only", X + _layer("p", "Pooling", extra="pooling_param { kernel_h: 2 }"), "p", r"kernel_h"),
    ("inner_product_axis", X + _layer("ip", "InnerProduct", extra="inner_product_param { num_output: 4 axis: 4 }"),
     "ip", r"axis 4"),
    ("concat_shapes", X + _input("z", 2, 3, 4, 8) + _layer("c", "Concat", bottoms=("x", "z")),
     "c", r"same shape except at the concat axis"),
    ("slice_points_not_increasing", X + _layer("s", "Slice", tops=("a", "b", "c"), extra="slice_param { axis: 2 "
                                               "slice_point: 4 slice_point: 2 }"),
     "s", r"slice_point"),
    ("eltwise_shapes", X + _input("z", 2, 3, 8, 4) + _layer("e", "Eltwise", bottoms=("x", "z")), "e", r"same shape"),
    ("eltwise_coeff_count", X + _input("z") + _layer("e", "Eltwise", bottoms=("x", "z"), extra="eltwise_param { coeff: 1 }"),
     "e", r"coeff"),
    ("reshape_two_minus_ones", X + _layer("r", "Reshape", extra="reshape_param { shape { dim: -1 dim: -1 } }"),
     "r", r"multiple -1"),
    ("reshape_zero_without_axis", _input("x", 6) + _layer("r", "Reshape", extra="reshape_param { shape { dim: 0 dim: 0 } }"),
     "r", r"contains a 0"),
    ("crop_out_of_bounds", X + _input("z", 2, 3, 4, 4) + _layer("c", "Crop", bottoms=("x", "z"),
                                                                extra="crop_param { axis: 2 offset: 5 }"),
     "c", r"offset 5"),
    ("flatten_end_axis_before_axis", X + _layer("f", "Flatten", extra="flatten_param { axis: 3 end_axis: 1 }"),
     "f", r"end_axis"),
    ("softmax_loss_label_count", X + _input("label", 2, 5) + _layer("loss", "SoftmaxWithLoss", bottoms=("x", "label")),
     "loss", r"number of labels"),
    ("accuracy_top_k", _input("x", 2, 3) + _input("label", 2)
     + _layer("acc", "Accuracy", bottoms=("x", "label"), extra="accuracy_param { top_k: 4 }"),
     "acc", r"top_k"),
    ("scale_shape", X + _input("s", 4) + _layer("sc", "Scale", bottoms=("x", "s")), "sc", r"dimension mismatch"),
    ("embed_input_dim", _input("x", 4) + _layer("e", "Embed", extra="embed_param { num_output: 3 input_dim: 0 }"),
     "e", r"input_dim"),
    ("batch_norm_lr_mult", X + _layer("bn", "BatchNorm", extra="param { lr_mult: 1 }"), "bn", r"lr_mult"),
    ("lrn_even_local_size", X + _layer("n", "LRN", extra="lrn_param { local_size: 4 }"), "n", r"local_size"),
    ("tile_without_tiles", X + _layer("t", "Tile"), "t", r"tiles"),
    ("argmax_top_k", X + _layer("a", "ArgMax", extra="argmax_param { top_k: 4 axis: 1 }"), "a", r"top_k"),
    ("shared_lr_mult_mismatch", X + _ip("ip1", "a", "lr_mult: 1") + _ip("ip2", "b", "lr_mult: 2"),
     "ip2", r"mismatched lr_mult"),
    ("shared_lr_mult_mismatch_with_earlier_sharer", X + _ip("ip1", "a", "") + _ip("ip2", "b", "lr_mult: 2")
     + _ip("ip3", "c", "lr_mult: 3"), "ip3", r"mismatched lr_mult: 3 here, 2"),
]

# what Caffe accepts and the engine accepts too (the first two it refused before)
ACCEPTED = [
    ("shared_lr_mult_set_by_sharer", X + _ip("ip1", "a", "") + _ip("ip2", "b", "lr_mult: 2")),
    ("shared_decay_mult_set_by_sharer", X + _ip("ip1", "a", "") + _ip("ip2", "b", "decay_mult: 2")),
    ("one_param_spec_per_blob", X + _layer("ip", "InnerProduct", extra="param { lr_mult: 1 } param { lr_mult: 2 } "
                                           "inner_product_param { num_output: 4 }")),
    ("loss_two_tops_with_loss_weights", _input("x", 2, 3) + _input("label", 2) + _input("H", 3, 3)
     + _layer("loss", "InfogainLoss", bottoms=("x", "label", "H"), tops=("l", "p"), extra="loss_weight: 1 loss_weight: 0")),
    ("flatten_like_reshape_not_in_place", X + _layer("r", "Reshape", extra="reshape_param { shape { dim: 2 dim: -1 } }")),
]

REFUSED = FIXED + ALREADY


def _write(tmp_dir, case: str, net: str) -> str:
    path = os.path.join(tmp_dir, f"{case}.prototxt")
    with open(path, "w") as f:
        f.write(f'name: "{case}"\n{net}')
    return path


def _engine_net(path: str) -> Net:
    param = prototxt.net_for_phase(prototxt.read_net(path), caffe_pb2.TEST, source=path)
    return Net(param, source=path)


@pytest.mark.parametrize("case,net,layer,field", REFUSED, ids=[c[0] for c in REFUSED])
def test_engine_refuses_what_caffe_refuses_naming_file_layer_and_field(tmp_path, case, net, layer, field):
    path = _write(tmp_path, case, net)
    with pytest.raises(UserError) as info:
        _engine_net(path)
    message = str(info.value)
    assert path in message and f"layer '{layer}'" in message
    assert re.search(field, message), message


@pytest.mark.parametrize("case,net", ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_engine_accepts_what_caffe_accepts(tmp_path, case, net):
    _engine_net(_write(tmp_path, case, net))


def test_a_shared_blob_takes_the_lr_mult_and_decay_mult_of_the_first_spec_that_sets_them(tmp_path):
    # Caffe's AppendParam: the owner set neither, so the sharer's values are the blob's
    net = X + _ip("ip1", "a", "") + _ip("ip2", "b", "lr_mult: 2 decay_mult: 3") + _ip("ip3", "c", "lr_mult: 2")
    infos = {i.name: i for i in _engine_net(_write(tmp_path, "shared", net)).param_infos}
    assert (infos["w"].lr_mult, infos["w"].decay_mult) == (2, 3)


# One process imports pycaffe once and forks a child per net: a CHECK failure aborts the child.
_CAFFE_RUNNER = textwrap.dedent("""
    import json, os, sys, tempfile
    import caffe
    results = {}
    for path in sys.argv[1:]:
        log = tempfile.TemporaryFile()
        pid = os.fork()
        if pid == 0:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                caffe.Net(path, caffe.TEST)
            except BaseException as e:
                sys.stderr.write(f"python exception: {e!r}\\n")
                sys.stderr.flush()
                os._exit(3)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        log.seek(0)
        results[path] = [status, log.read().decode("utf-8", "replace")]
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def caffe_results(tmp_path_factory):
    """Real Caffe's (wait status, output) for every net of the tables, by case name."""
    import_pycaffe()
    tmp_dir = tmp_path_factory.mktemp("caffe_checks")
    paths = {case: _write(tmp_dir, case, net) for case, net, *_ in REFUSED + ACCEPTED}
    env = dict(os.environ, GLOG_minloglevel="0")
    run = subprocess.run([sys.executable, "-c", _CAFFE_RUNNER, *paths.values()], capture_output=True, text=True,
                         env=env, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    by_path = json.loads(run.stdout.splitlines()[-1])
    return {case: by_path[path] for case, path in paths.items()}


@pytest.mark.parametrize("case", [c[0] for c in REFUSED])
def test_real_caffe_refuses_it_too(caffe_results, case):
    status, output = caffe_results[case]
    assert status != 0 and "Check failed" in output, output[-2000:]


@pytest.mark.parametrize("case", [c[0] for c in ACCEPTED])
def test_real_caffe_accepts_it_too(caffe_results, case):
    status, output = caffe_results[case]
    assert status == 0, output[-2000:]
