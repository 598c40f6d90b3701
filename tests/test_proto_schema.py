"""mpicaffe/proto/caffe.proto must read and write exactly what BVLC Caffe does.

The wire tests build their bytes by hand from the protobuf encoding rules
(key = field_number << 3 | wire_type), so a wrong number, type or packing shows up
as a failed parse or a byte mismatch. The default table and the field-number tables
are facts of Caffe's schema (Debian 1.0.0+git20180821.99bd997). The descriptor
comparison is the thorough check; it needs real Caffe's schema, and without one it skips
outside CI and fails in CI (tests/real_caffe.py).
"""

from __future__ import annotations

import ast
import glob
import importlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, runtime_version, text_format

from mpicaffe.proto import caffe_pb2
from tests.real_caffe import _missing, import_pycaffe

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTO_REL = "mpicaffe/proto/caffe.proto"

# Wire types.
VARINT, I64, LEN, I32 = 0, 1, 2, 5


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32/int64 go out as 10-byte two's complement
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def key(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def f_varint(number: int, value: int) -> bytes:
    return key(number, VARINT) + varint(value)


def f_len(number: int, payload: bytes) -> bytes:
    return key(number, LEN) + varint(len(payload)) + payload


def f_float(number: int, value: float) -> bytes:
    return key(number, I32) + struct.pack("<f", value)


def packed_floats(number: int, values: list[float]) -> bytes:
    return f_len(number, struct.pack(f"<{len(values)}f", *values))


def packed_doubles(number: int, values: list[float]) -> bytes:
    return f_len(number, struct.pack(f"<{len(values)}d", *values))


def packed_varints(number: int, values: list[int]) -> bytes:
    return f_len(number, b"".join(varint(v) for v in values))


# --------------------------------------------------------------------------- wire format


def test_datum_wire_format():
    pixels = bytes([0, 127, 255, 16, 32, 48])
    wire = (
        b"\x08\x03"  # channels = 3
        b"\x10\x02"  # height = 2
        b"\x18\x01"  # width = 1
        b"\x22\x06" + pixels  # data, length-delimited
        + b"\x28\x07"  # label = 7
        # float_data is a plain (unpacked) repeated float: one fixed32 key per value
        + b"\x35" + struct.pack("<f", 0.5)
        + b"\x35" + struct.pack("<f", -2.0)
        + b"\x38\x01"  # encoded = true
    )
    datum = caffe_pb2.Datum.FromString(wire)
    assert (datum.channels, datum.height, datum.width, datum.label) == (3, 2, 1, 7)
    assert datum.data == pixels
    assert list(datum.float_data) == [0.5, -2.0]
    assert datum.encoded is True

    ours = caffe_pb2.Datum(channels=3, height=2, width=1, data=pixels, label=7,
                           float_data=[0.5, -2.0], encoded=True)
    assert ours.SerializeToString() == wire


def test_datum_label_is_int32_varint():
    # A negative int32 is a 10-byte varint (not zigzag as sint32 would be).
    wire = b"\x28" + b"\xff" * 9 + b"\x01"
    assert caffe_pb2.Datum.FromString(wire).label == -1
    assert caffe_pb2.Datum(label=-1).SerializeToString() == wire


def test_blobproto_with_shape_and_packed_data_wire_format():
    shape = packed_varints(1, [2, 3, 3_000_000_000])  # BlobShape.dim: packed int64
    wire = (
        packed_floats(5, [1.0, -1.5, 0.25])  # data
        + packed_floats(6, [0.125, 0.0, 4.0])  # diff
        + f_len(7, shape)  # shape
        + packed_doubles(8, [1e-300, 2.5])  # double_data
        + packed_doubles(9, [3.0])  # double_diff
    )
    blob = caffe_pb2.BlobProto.FromString(wire)
    assert list(blob.shape.dim) == [2, 3, 3_000_000_000]
    assert list(blob.data) == [1.0, -1.5, 0.25]
    assert list(blob.diff) == [0.125, 0.0, 4.0]
    assert list(blob.double_data) == [1e-300, 2.5]
    assert list(blob.double_diff) == [3.0]
    assert not blob.HasField("num")

    ours = caffe_pb2.BlobProto(data=[1.0, -1.5, 0.25], diff=[0.125, 0.0, 4.0],
                               double_data=[1e-300, 2.5], double_diff=[3.0])
    ours.shape.dim.extend([2, 3, 3_000_000_000])
    assert ours.SerializeToString() == wire


def test_blobproto_legacy_4d_wire_format():
    wire = (
        f_varint(1, 2)  # num
        + f_varint(2, 1)  # channels
        + f_varint(3, 1)  # height
        + f_varint(4, 2)  # width
        + packed_floats(5, [1.0, 2.0, 3.0, 4.0])
    )
    blob = caffe_pb2.BlobProto.FromString(wire)
    assert (blob.num, blob.channels, blob.height, blob.width) == (2, 1, 1, 2)
    assert list(blob.data) == [1.0, 2.0, 3.0, 4.0]
    assert not blob.HasField("shape")
    ours = caffe_pb2.BlobProto(num=2, channels=1, height=1, width=2, data=[1.0, 2.0, 3.0, 4.0])
    assert ours.SerializeToString() == wire


def test_blobproto_reads_unpacked_floats_too():
    # proto2 parsers accept either encoding of a repeated scalar; old writers used unpacked.
    wire = f_float(5, 1.0) + f_float(5, 2.0)
    assert list(caffe_pb2.BlobProto.FromString(wire).data) == [1.0, 2.0]


def test_solverstate_wire_format():
    history = [packed_floats(5, [0.5, 0.25]), f_len(7, packed_varints(1, [1]))]
    wire = (
        f_varint(1, 10000)  # iter
        + f_len(2, b"lenet_iter_10000.caffemodel")  # learned_net
        + f_len(3, history[0])  # history, one BlobProto each
        + f_len(3, history[1])
        + f_varint(4, 2)  # current_step
    )
    state = caffe_pb2.SolverState.FromString(wire)
    assert state.iter == 10000
    assert state.learned_net == "lenet_iter_10000.caffemodel"
    assert len(state.history) == 2
    assert list(state.history[0].data) == [0.5, 0.25]
    assert list(state.history[1].shape.dim) == [1]
    assert state.current_step == 2

    ours = caffe_pb2.SolverState(iter=10000, learned_net="lenet_iter_10000.caffemodel", current_step=2)
    ours.history.add(data=[0.5, 0.25])
    ours.history.add().shape.dim.append(1)
    assert ours.SerializeToString() == wire


def test_netparameter_with_one_layer_wire_format():
    weight = packed_floats(5, [0.5] * 4) + f_len(7, packed_varints(1, [20, 1, 5, 5]))  # data; shape
    conv = f_varint(1, 20) + f_varint(4, 5)  # num_output; kernel_size is repeated, unpacked
    layer = (
        f_len(1, b"conv1")  # name
        + f_len(2, b"Convolution")  # type
        + f_len(3, b"data")  # bottom
        + f_len(4, b"conv1")  # top
        + f_len(6, f_float(3, 1.0) + f_float(4, 1.0))  # param {lr_mult, decay_mult}
        + f_len(6, f_float(3, 2.0) + f_float(4, 0.0))
        + f_len(7, weight)  # blobs
        + f_varint(10, 1)  # phase = TEST
        + f_len(106, conv)  # convolution_param
    )
    wire = f_len(1, b"tiny") + f_len(100, layer)  # name; layer = 100
    # Field 100 and 106 keys are two-byte varints; pin them literally as well.
    assert key(100, LEN) == b"\xa2\x06" and key(106, LEN) == b"\xd2\x06"

    net = caffe_pb2.NetParameter.FromString(wire)
    assert net.name == "tiny"
    assert len(net.layer) == 1 and len(net.layers) == 0
    lay = net.layer[0]
    assert (lay.name, lay.type, list(lay.bottom), list(lay.top)) == ("conv1", "Convolution", ["data"], ["conv1"])
    assert [(p.lr_mult, p.decay_mult) for p in lay.param] == [(1.0, 1.0), (2.0, 0.0)]
    assert list(lay.blobs[0].shape.dim) == [20, 1, 5, 5]
    assert lay.phase == caffe_pb2.TEST
    assert lay.convolution_param.num_output == 20
    assert list(lay.convolution_param.kernel_size) == [5]

    ours = caffe_pb2.NetParameter(name="tiny")
    lay = ours.layer.add(name="conv1", type="Convolution", bottom=["data"], top=["conv1"], phase=caffe_pb2.TEST)
    lay.param.add(lr_mult=1.0, decay_mult=1.0)
    lay.param.add(lr_mult=2.0, decay_mult=0.0)
    blob = lay.blobs.add(data=[0.5] * 4)
    blob.shape.dim.extend([20, 1, 5, 5])
    lay.convolution_param.num_output = 20
    lay.convolution_param.kernel_size.append(5)
    assert ours.SerializeToString() == wire


def test_v1_layers_field_and_enum_type_wire_format():
    layer = f_len(2, b"data") + f_len(3, b"conv1") + f_len(4, b"conv1") + f_varint(5, 4)
    wire = f_len(2, layer)  # NetParameter.layers = 2 (V1); type = CONVOLUTION (4)
    net = caffe_pb2.NetParameter.FromString(wire)
    assert net.layers[0].type == caffe_pb2.V1LayerParameter.CONVOLUTION
    assert net.layers[0].name == "conv1"
    assert net.SerializeToString() == wire


# --------------------------------------------------------------------------- defaults

F32 = {"rel": 1e-6}  # float fields hold float32 values

DEFAULTS = [
    # (message, field, default); None marks a field without an explicit Caffe default.
    ("SolverParameter", "base_lr", None),
    ("SolverParameter", "momentum", None),
    ("SolverParameter", "weight_decay", None),
    ("SolverParameter", "gamma", None),
    ("SolverParameter", "power", None),
    ("SolverParameter", "lr_policy", None),
    ("SolverParameter", "max_iter", None),
    ("SolverParameter", "display", None),
    ("SolverParameter", "stepsize", None),
    ("SolverParameter", "delta", 1e-8),
    ("SolverParameter", "momentum2", 0.999),
    ("SolverParameter", "rms_decay", 0.99),
    ("SolverParameter", "snapshot_format", "BINARYPROTO"),
    ("SolverParameter", "solver_mode", "GPU"),
    ("SolverParameter", "solver_type", "SGD"),
    ("SolverParameter", "type", "SGD"),
    ("SolverParameter", "regularization_type", "L2"),
    ("SolverParameter", "clip_gradients", -1.0),
    ("SolverParameter", "iter_size", 1),
    ("SolverParameter", "average_loss", 1),
    ("SolverParameter", "test_initialization", True),
    ("SolverParameter", "test_interval", 0),
    ("SolverParameter", "test_compute_loss", False),
    ("SolverParameter", "snapshot", 0),
    ("SolverParameter", "snapshot_diff", False),
    ("SolverParameter", "snapshot_after_train", True),
    ("SolverParameter", "device_id", 0),
    ("SolverParameter", "random_seed", -1),
    ("SolverParameter", "debug_info", False),
    ("SolverParameter", "layer_wise_reduce", True),
    ("SolverState", "current_step", 0),
    ("NetParameter", "force_backward", False),
    ("NetParameter", "debug_info", False),
    ("NetState", "phase", "TEST"),
    ("NetState", "level", 0),
    ("NetStateRule", "phase", None),
    ("ParamSpec", "lr_mult", 1.0),
    ("ParamSpec", "decay_mult", 1.0),
    ("ParamSpec", "share_mode", None),
    ("LayerParameter", "phase", None),
    ("FillerParameter", "type", "constant"),
    ("FillerParameter", "value", 0.0),
    ("FillerParameter", "min", 0.0),
    ("FillerParameter", "max", 1.0),
    ("FillerParameter", "mean", 0.0),
    ("FillerParameter", "std", 1.0),
    ("FillerParameter", "sparse", -1),
    ("FillerParameter", "variance_norm", "FAN_IN"),
    ("TransformationParameter", "scale", 1.0),
    ("TransformationParameter", "mirror", False),
    ("TransformationParameter", "crop_size", 0),
    ("LossParameter", "normalization", "VALID"),
    ("LossParameter", "normalize", None),
    ("LossParameter", "ignore_label", None),
    ("AccuracyParameter", "top_k", 1),
    ("AccuracyParameter", "axis", 1),
    ("ArgMaxParameter", "top_k", 1),
    ("ArgMaxParameter", "out_max_val", False),
    ("BatchNormParameter", "use_global_stats", None),
    ("BatchNormParameter", "eps", 1e-5),
    ("BatchNormParameter", "moving_average_fraction", 0.999),
    ("BiasParameter", "axis", 1),
    ("BiasParameter", "num_axes", 1),
    ("ConcatParameter", "axis", 1),
    ("ConcatParameter", "concat_dim", 1),
    ("ContrastiveLossParameter", "margin", 1.0),
    ("ConvolutionParameter", "bias_term", True),
    ("ConvolutionParameter", "group", 1),
    ("ConvolutionParameter", "axis", 1),
    ("ConvolutionParameter", "pad_h", 0),
    ("ConvolutionParameter", "engine", "DEFAULT"),
    ("ConvolutionParameter", "force_nd_im2col", False),
    ("ConvolutionParameter", "num_output", None),
    ("CropParameter", "axis", 2),
    ("DataParameter", "backend", "LEVELDB"),
    ("DataParameter", "prefetch", 4),
    ("DataParameter", "rand_skip", 0),
    ("DropoutParameter", "dropout_ratio", 0.5),
    ("EltwiseParameter", "operation", "SUM"),
    ("EltwiseParameter", "stable_prod_grad", True),
    ("ELUParameter", "alpha", 1.0),
    ("EmbedParameter", "bias_term", True),
    ("ExpParameter", "base", -1.0),
    ("ExpParameter", "scale", 1.0),
    ("ExpParameter", "shift", 0.0),
    ("FlattenParameter", "axis", 1),
    ("FlattenParameter", "end_axis", -1),
    ("HingeLossParameter", "norm", "L1"),
    ("ImageDataParameter", "batch_size", 1),
    ("ImageDataParameter", "is_color", True),
    ("ImageDataParameter", "root_folder", ""),
    ("InfogainLossParameter", "axis", 1),
    ("InnerProductParameter", "bias_term", True),
    ("InnerProductParameter", "axis", 1),
    ("InnerProductParameter", "transpose", False),
    ("LogParameter", "base", -1.0),
    ("LRNParameter", "local_size", 5),
    ("LRNParameter", "alpha", 1.0),
    ("LRNParameter", "beta", 0.75),
    ("LRNParameter", "k", 1.0),
    ("LRNParameter", "norm_region", "ACROSS_CHANNELS"),
    ("MVNParameter", "normalize_variance", True),
    ("MVNParameter", "across_channels", False),
    ("MVNParameter", "eps", 1e-9),
    ("PoolingParameter", "pool", "MAX"),
    ("PoolingParameter", "pad", 0),
    ("PoolingParameter", "stride", 1),
    ("PoolingParameter", "global_pooling", False),
    ("PoolingParameter", "round_mode", "CEIL"),
    ("PoolingParameter", "kernel_size", None),
    ("PowerParameter", "power", 1.0),
    ("PowerParameter", "scale", 1.0),
    ("PowerParameter", "shift", 0.0),
    ("PReLUParameter", "channel_shared", False),
    ("PythonParameter", "param_str", ""),
    ("PythonParameter", "share_in_parallel", False),
    ("RecurrentParameter", "num_output", 0),
    ("RecurrentParameter", "expose_hidden", False),
    ("ReductionParameter", "operation", "SUM"),
    ("ReductionParameter", "axis", 0),
    ("ReductionParameter", "coeff", 1.0),
    ("ReLUParameter", "negative_slope", 0.0),
    ("ReshapeParameter", "axis", 0),
    ("ReshapeParameter", "num_axes", -1),
    ("ScaleParameter", "axis", 1),
    ("ScaleParameter", "num_axes", 1),
    ("ScaleParameter", "bias_term", False),
    ("SliceParameter", "axis", 1),
    ("SliceParameter", "slice_dim", 1),
    ("SoftmaxParameter", "axis", 1),
    ("SoftmaxParameter", "engine", "DEFAULT"),
    ("SPPParameter", "pool", "MAX"),
    ("SwishParameter", "beta", 1.0),
    ("ThresholdParameter", "threshold", 0.0),
    ("TileParameter", "axis", 1),
    ("WindowDataParameter", "fg_threshold", 0.5),
    ("WindowDataParameter", "bg_threshold", 0.5),
    ("WindowDataParameter", "fg_fraction", 0.25),
    ("WindowDataParameter", "crop_mode", "warp"),
    ("V0LayerParameter", "biasterm", True),
    ("V0LayerParameter", "pool", "MAX"),
    ("V0LayerParameter", "dropout_ratio", 0.5),
    ("V0LayerParameter", "k", 1.0),
    ("V0LayerParameter", "det_crop_mode", "warp"),
    ("V0LayerParameter", "concat_dim", 1),
    ("Datum", "encoded", False),
    ("BlobProto", "num", 0),
]


@pytest.mark.parametrize(("message", "field", "expected"), DEFAULTS,
                         ids=[f"{m}.{f}" for m, f, _ in DEFAULTS])
def test_default(message, field, expected):
    cls = getattr(caffe_pb2, message)
    fd = cls.DESCRIPTOR.fields_by_name[field]
    msg = cls()
    assert not msg.HasField(field)
    value = getattr(msg, field)
    if expected is None:
        assert not fd.has_default_value, f"Caffe gives {message}.{field} no explicit default"
        return
    assert fd.has_default_value, f"Caffe gives {message}.{field} an explicit default"
    if fd.enum_type is not None:
        assert fd.enum_type.values_by_number[value].name == expected
    elif isinstance(expected, float):
        assert value == pytest.approx(expected, **F32)
    else:
        assert type(value) is type(expected) and value == expected


# --------------------------------------------------------------------------- field-number tables

LAYER_PARAM_NUMBERS = {
    "name": 1, "type": 2, "bottom": 3, "top": 4, "loss_weight": 5, "param": 6, "blobs": 7,
    "include": 8, "exclude": 9, "phase": 10, "propagate_down": 11,
    "transform_param": 100, "loss_param": 101, "accuracy_param": 102, "argmax_param": 103,
    "concat_param": 104, "contrastive_loss_param": 105, "convolution_param": 106, "data_param": 107,
    "dropout_param": 108, "dummy_data_param": 109, "eltwise_param": 110, "exp_param": 111,
    "hdf5_data_param": 112, "hdf5_output_param": 113, "hinge_loss_param": 114,
    "image_data_param": 115, "infogain_loss_param": 116, "inner_product_param": 117, "lrn_param": 118,
    "memory_data_param": 119, "mvn_param": 120, "pooling_param": 121, "power_param": 122,
    "relu_param": 123, "sigmoid_param": 124, "softmax_param": 125, "slice_param": 126,
    "tanh_param": 127, "threshold_param": 128, "window_data_param": 129, "python_param": 130,
    "prelu_param": 131, "spp_param": 132, "reshape_param": 133, "log_param": 134, "flatten_param": 135,
    "reduction_param": 136, "embed_param": 137, "tile_param": 138, "batch_norm_param": 139,
    "elu_param": 140, "bias_param": 141, "scale_param": 142, "input_param": 143, "crop_param": 144,
    "parameter_param": 145, "recurrent_param": 146, "swish_param": 147, "clip_param": 148,
}

V1_LAYER_TYPES = {
    "NONE": 0, "ABSVAL": 35, "ACCURACY": 1, "ARGMAX": 30, "BNLL": 2, "CONCAT": 3,
    "CONTRASTIVE_LOSS": 37, "CONVOLUTION": 4, "DATA": 5, "DECONVOLUTION": 39, "DROPOUT": 6,
    "DUMMY_DATA": 32, "EUCLIDEAN_LOSS": 7, "ELTWISE": 25, "EXP": 38, "FLATTEN": 8, "HDF5_DATA": 9,
    "HDF5_OUTPUT": 10, "HINGE_LOSS": 28, "IM2COL": 11, "IMAGE_DATA": 12, "INFOGAIN_LOSS": 13,
    "INNER_PRODUCT": 14, "LRN": 15, "MEMORY_DATA": 29, "MULTINOMIAL_LOGISTIC_LOSS": 16, "MVN": 34,
    "POOLING": 17, "POWER": 26, "RELU": 18, "SIGMOID": 19, "SIGMOID_CROSS_ENTROPY_LOSS": 27,
    "SILENCE": 36, "SOFTMAX": 20, "SOFTMAX_LOSS": 21, "SPLIT": 22, "SLICE": 33, "TANH": 23,
    "WINDOW_DATA": 24, "THRESHOLD": 31,
}

SOLVER_NUMBERS = {
    "train_net": 1, "test_net": 2, "test_iter": 3, "test_interval": 4, "base_lr": 5, "display": 6,
    "max_iter": 7, "lr_policy": 8, "gamma": 9, "power": 10, "momentum": 11, "weight_decay": 12,
    "stepsize": 13, "snapshot": 14, "snapshot_prefix": 15, "snapshot_diff": 16, "solver_mode": 17,
    "device_id": 18, "test_compute_loss": 19, "random_seed": 20, "train_net_param": 21,
    "test_net_param": 22, "debug_info": 23, "net": 24, "net_param": 25, "train_state": 26,
    "test_state": 27, "snapshot_after_train": 28, "regularization_type": 29, "solver_type": 30,
    "delta": 31, "test_initialization": 32, "average_loss": 33, "stepvalue": 34,
    "clip_gradients": 35, "iter_size": 36, "snapshot_format": 37, "rms_decay": 38, "momentum2": 39,
    "type": 40, "layer_wise_reduce": 41, "weights": 42,
}


def _numbers(cls) -> dict[str, int]:
    return {f.name: f.number for f in cls.DESCRIPTOR.fields}


def test_layer_parameter_field_numbers():
    assert _numbers(caffe_pb2.LayerParameter) == LAYER_PARAM_NUMBERS


def test_solver_parameter_field_numbers():
    assert _numbers(caffe_pb2.SolverParameter) == SOLVER_NUMBERS


def test_v1_layer_type_enum():
    enum = caffe_pb2.V1LayerParameter.LayerType.DESCRIPTOR
    assert [(v.name, v.number) for v in enum.values] == list(V1_LAYER_TYPES.items())


def test_package_and_file_name_leave_room_for_pycaffe():
    assert caffe_pb2.DESCRIPTOR.package == "mpicaffe"
    assert caffe_pb2.DESCRIPTOR.name == PROTO_REL
    assert _fdp(caffe_pb2.DESCRIPTOR).syntax in ("", "proto2")


EXPECTED_MESSAGES = [
    "BlobShape", "BlobProto", "BlobProtoVector", "Datum", "FillerParameter", "NetParameter",
    "SolverParameter", "SolverState", "NetState", "NetStateRule", "ParamSpec", "LayerParameter",
    "TransformationParameter", "LossParameter", "AccuracyParameter", "ArgMaxParameter",
    "BatchNormParameter", "BiasParameter", "ClipParameter", "ConcatParameter",
    "ContrastiveLossParameter", "ConvolutionParameter", "CropParameter", "DataParameter",
    "DropoutParameter", "DummyDataParameter", "EltwiseParameter", "ELUParameter", "EmbedParameter",
    "ExpParameter", "FlattenParameter", "HDF5DataParameter", "HDF5OutputParameter",
    "HingeLossParameter", "ImageDataParameter", "InfogainLossParameter", "InnerProductParameter",
    "InputParameter", "LogParameter", "LRNParameter", "MemoryDataParameter", "MVNParameter",
    "ParameterParameter", "PoolingParameter", "PowerParameter", "PReLUParameter", "PythonParameter",
    "RecurrentParameter", "ReductionParameter", "ReLUParameter", "ReshapeParameter", "ScaleParameter",
    "SigmoidParameter", "SliceParameter", "SoftmaxParameter", "SPPParameter", "SwishParameter",
    "TanHParameter", "ThresholdParameter", "TileParameter", "WindowDataParameter", "V1LayerParameter",
    "V0LayerParameter",
]


def test_message_set_is_caffes():
    assert sorted(caffe_pb2.DESCRIPTOR.message_types_by_name) == sorted(EXPECTED_MESSAGES)
    assert list(caffe_pb2.DESCRIPTOR.enum_types_by_name) == ["Phase"]
    assert (caffe_pb2.TRAIN, caffe_pb2.TEST) == (0, 1)


# --------------------------------------------------------------------------- text format

LENET = """
name: "LeNet"
layer {
  name: "mnist"
  type: "Data"
  top: "data"
  top: "label"
  include { phase: TRAIN }
  transform_param { scale: 0.00390625 mirror: false mean_value: 104 mean_value: 117 }
  data_param { source: "examples/mnist/mnist_train_lmdb" batch_size: 64 backend: LMDB }
}
layer {
  name: "conv1"
  type: "Convolution"
  bottom: "data"
  top: "conv1"
  param { lr_mult: 1 }
  param { lr_mult: 2 decay_mult: 0 }
  convolution_param {
    num_output: 20
    kernel_size: 5
    stride: 1
    weight_filler { type: "xavier" variance_norm: AVERAGE }
    bias_filler { type: "constant" }
    engine: CAFFE
  }
}
layer {
  name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 round_mode: FLOOR }
}
layer { name: "ip1" type: "InnerProduct" bottom: "pool1" top: "ip1"
        inner_product_param { num_output: 500 weight_filler { type: "gaussian" std: 0.01 } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" relu_param { negative_slope: 0.1 } }
layer { name: "drop1" type: "Dropout" bottom: "ip1" top: "ip1" dropout_param { dropout_ratio: 0.3 } }
layer { name: "bn" type: "BatchNorm" bottom: "ip1" top: "ip1"
        batch_norm_param { use_global_stats: false moving_average_fraction: 0.9 eps: 0.001 } }
layer {
  name: "accuracy" type: "Accuracy" bottom: "ip1" bottom: "label" top: "accuracy"
  include { phase: TEST stage: "val" not_stage: "deploy" min_level: 1 }
  accuracy_param { top_k: 5 }
}
layer {
  name: "loss" type: "SoftmaxWithLoss" bottom: "ip1" bottom: "label" top: "loss"
  loss_weight: 1
  loss_param { ignore_label: -1 normalization: BATCH_SIZE }
}
"""


def test_lenet_prototxt_parses():
    net = text_format.Parse(LENET, caffe_pb2.NetParameter())
    assert net.name == "LeNet"
    assert [lay.type for lay in net.layer] == [
        "Data", "Convolution", "Pooling", "InnerProduct", "ReLU", "Dropout", "BatchNorm", "Accuracy",
        "SoftmaxWithLoss"]
    data, conv, pool, ip1, relu, drop, bn, acc, loss = net.layer
    assert data.include[0].phase == caffe_pb2.TRAIN
    assert data.transform_param.scale == pytest.approx(1 / 256)
    assert list(data.transform_param.mean_value) == [104, 117]
    assert data.data_param.backend == caffe_pb2.DataParameter.LMDB
    assert [(p.lr_mult, p.decay_mult) for p in conv.param] == [(1, 1), (2, 0)]
    cp = conv.convolution_param
    assert (cp.num_output, list(cp.kernel_size), list(cp.stride)) == (20, [5], [1])
    assert cp.weight_filler.variance_norm == caffe_pb2.FillerParameter.AVERAGE
    assert cp.engine == caffe_pb2.ConvolutionParameter.CAFFE
    assert pool.pooling_param.round_mode == caffe_pb2.PoolingParameter.FLOOR
    assert ip1.inner_product_param.weight_filler.std == pytest.approx(0.01, **F32)
    assert relu.relu_param.negative_slope == pytest.approx(0.1, **F32)
    assert drop.dropout_param.dropout_ratio == pytest.approx(0.3, **F32)
    assert bn.batch_norm_param.HasField("use_global_stats")
    rule = acc.include[0]
    assert (rule.phase, list(rule.stage), list(rule.not_stage), rule.min_level) == (
        caffe_pb2.TEST, ["val"], ["deploy"], 1)
    assert acc.accuracy_param.top_k == 5
    assert list(loss.loss_weight) == [1.0]
    assert loss.loss_param.ignore_label == -1
    assert loss.loss_param.normalization == caffe_pb2.LossParameter.BATCH_SIZE
    # And back: text output re-parses to the same message.
    again = text_format.Parse(text_format.MessageToString(net), caffe_pb2.NetParameter())
    assert again == net


V1_NET = """
name: "CaffeNet-v1"
input: "data"
input_dim: 10 input_dim: 3 input_dim: 227 input_dim: 227
layers {
  name: "conv1"
  type: CONVOLUTION
  bottom: "data"
  top: "conv1"
  blobs_lr: 1 blobs_lr: 2
  weight_decay: 1 weight_decay: 0
  param: "conv1_w" param: "conv1_b"
  blob_share_mode: PERMISSIVE
  convolution_param { num_output: 96 kernel_size: 11 stride: 4 }
}
layers { name: "relu1" type: RELU bottom: "conv1" top: "conv1" }
layers {
  name: "pool1" type: POOLING bottom: "conv1" top: "pool1"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 }
}
layers {
  name: "old" type: NONE
  layer { name: "old" type: "conv" num_output: 8 biasterm: false kernelsize: 3 pool: STOCHASTIC }
}
"""


def test_v1_net_with_enum_layer_types_parses():
    net = text_format.Parse(V1_NET, caffe_pb2.NetParameter())
    assert list(net.input) == ["data"] and list(net.input_dim) == [10, 3, 227, 227]
    V1 = caffe_pb2.V1LayerParameter
    assert [lay.type for lay in net.layers] == [V1.CONVOLUTION, V1.RELU, V1.POOLING, V1.NONE]
    conv = net.layers[0]
    assert list(conv.blobs_lr) == [1, 2] and list(conv.weight_decay) == [1, 0]
    assert list(conv.param) == ["conv1_w", "conv1_b"]
    assert list(conv.blob_share_mode) == [V1.PERMISSIVE]
    assert conv.convolution_param.num_output == 96
    assert net.layers[2].pooling_param.pool == caffe_pb2.PoolingParameter.AVE
    v0 = net.layers[3].layer
    assert (v0.num_output, v0.biasterm, v0.kernelsize) == (8, False, 3)
    assert v0.pool == caffe_pb2.V0LayerParameter.STOCHASTIC


SOLVER = """
net: "examples/mnist/lenet_train_test.prototxt"
test_iter: 100
test_interval: 500
base_lr: 0.01
momentum: 0.9
weight_decay: 0.0005
lr_policy: "multistep"
stepvalue: 5000 stepvalue: 7000
gamma: 0.1
display: 100
max_iter: 10000
snapshot: 5000
snapshot_prefix: "examples/mnist/lenet"
snapshot_format: HDF5
solver_mode: CPU
solver_type: NESTEROV
type: "Adam"
random_seed: 1701
weights: "a.caffemodel"
weights: "b.caffemodel"
"""


def test_solver_prototxt_parses():
    s = text_format.Parse(SOLVER, caffe_pb2.SolverParameter())
    P = caffe_pb2.SolverParameter
    assert s.net.endswith("lenet_train_test.prototxt")
    assert (list(s.test_iter), s.test_interval, s.max_iter) == ([100], 500, 10000)
    assert s.base_lr == pytest.approx(0.01, **F32)
    assert list(s.stepvalue) == [5000, 7000]
    assert (s.snapshot_format, s.solver_mode, s.solver_type) == (P.HDF5, P.CPU, P.NESTEROV)
    assert s.type == "Adam"
    assert s.random_seed == 1701
    assert list(s.weights) == ["a.caffemodel", "b.caffemodel"]


# --------------------------------------------------------------------------- descriptor comparison

_LABELS = {1: "optional", 2: "required", 3: "repeated"}


def _fdp(file_descriptor) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    file_descriptor.CopyToProto(proto)
    return proto


def _unqualify(type_name: str, package: str) -> str:
    prefix = "." + package + "."
    return type_name.removeprefix(prefix)


def _default(field: descriptor_pb2.FieldDescriptorProto):
    """The explicit default as a comparable value, or None when the field has none."""
    if not field.HasField("default_value"):
        return None
    text = field.default_value
    T = descriptor_pb2.FieldDescriptorProto
    if field.type in (T.TYPE_FLOAT, T.TYPE_DOUBLE):
        value = float(text)
        return struct.unpack("<f", struct.pack("<f", value))[0] if field.type == T.TYPE_FLOAT else value
    if field.type == T.TYPE_BOOL:
        return text == "true"
    if field.type in (T.TYPE_STRING, T.TYPE_BYTES, T.TYPE_ENUM):
        return text
    return int(text)


def _field_facts(field: descriptor_pb2.FieldDescriptorProto, package: str) -> dict:
    return {
        "number": field.number,
        "label": _LABELS[field.label],
        "type": descriptor_pb2.FieldDescriptorProto.Type.Name(field.type),
        "type_name": _unqualify(field.type_name, package),
        "default": _default(field),
        "packed": field.options.packed if field.options.HasField("packed") else None,
    }


def _walk(messages, prefix=""):
    for message in messages:
        name = prefix + message.name
        yield name, message
        yield from _walk(message.nested_type, name + ".")


def _enums(fdp: descriptor_pb2.FileDescriptorProto):
    for enum in fdp.enum_type:
        yield enum.name, enum
    for name, message in _walk(fdp.message_type):
        for enum in message.enum_type:
            yield f"{name}.{enum.name}", enum


def schema_mismatches(caffe: descriptor_pb2.FileDescriptorProto,
                      ours: descriptor_pb2.FileDescriptorProto) -> list[str]:
    """Every difference between two caffe.proto schemas, ignoring package, comments and order."""
    problems = []
    if (caffe.syntax or "proto2") != (ours.syntax or "proto2"):
        problems.append(f"syntax: caffe {caffe.syntax!r}, ours {ours.syntax!r}")
    theirs_msgs = dict(_walk(caffe.message_type))
    our_msgs = dict(_walk(ours.message_type))
    for name in sorted(theirs_msgs.keys() - our_msgs.keys()):
        problems.append(f"message {name}: missing from ours")
    for name in sorted(our_msgs.keys() - theirs_msgs.keys()):
        problems.append(f"message {name}: not in Caffe")
    for name in sorted(theirs_msgs.keys() & our_msgs.keys()):
        theirs_raw = {f.name: f for f in theirs_msgs[name].field}
        mine_raw = {f.name: f for f in our_msgs[name].field}
        theirs = {n: _field_facts(f, caffe.package) for n, f in theirs_raw.items()}
        mine = {n: _field_facts(f, ours.package) for n, f in mine_raw.items()}
        for field in sorted(theirs.keys() - mine.keys()):
            problems.append(f"{name}.{field}: missing from ours ({theirs[field]})")
        for field in sorted(mine.keys() - theirs.keys()):
            problems.append(f"{name}.{field}: not in Caffe ({mine[field]})")
        for field in sorted(theirs.keys() & mine.keys()):
            for fact, value in theirs[field].items():
                if mine[field][fact] == value:
                    continue
                if fact == "default":  # show the text as written, not the float32 it rounds to
                    shown = [f.default_value if f.HasField("default_value") else None
                             for f in (mine_raw[field], theirs_raw[field])]
                else:
                    shown = [mine[field][fact], value]
                problems.append(f"{name}.{field}: {fact} is {shown[0]!r}, Caffe has {shown[1]!r}")
        if [o.name for o in theirs_msgs[name].oneof_decl] != [o.name for o in our_msgs[name].oneof_decl]:
            problems.append(f"{name}: oneofs differ")
    theirs_enums = dict(_enums(caffe))
    our_enums = dict(_enums(ours))
    for name in sorted(theirs_enums.keys() - our_enums.keys()):
        problems.append(f"enum {name}: missing from ours")
    for name in sorted(our_enums.keys() - theirs_enums.keys()):
        problems.append(f"enum {name}: not in Caffe")
    for name in sorted(theirs_enums.keys() & our_enums.keys()):
        # Order counts: an enum field without an explicit default takes the first value.
        theirs = [(v.name, v.number) for v in theirs_enums[name].value]
        mine = [(v.name, v.number) for v in our_enums[name].value]
        theirs_map, mine_map = dict(theirs), dict(mine)
        for value in sorted(theirs_map.keys() - mine_map.keys()):
            problems.append(f"enum {name}: value {value} = {theirs_map[value]} missing from ours")
        for value in sorted(mine_map.keys() - theirs_map.keys()):
            problems.append(f"enum {name}: value {value} = {mine_map[value]} not in Caffe")
        for value in sorted(theirs_map.keys() & mine_map.keys()):
            if theirs_map[value] != mine_map[value]:
                problems.append(f"enum {name}: value {value} is {mine_map[value]}, Caffe has {theirs_map[value]}")
        if theirs_map == mine_map and theirs != mine:
            problems.append(f"enum {name}: value order is {[n for n, _ in mine]}, Caffe has {[n for n, _ in theirs]}")
    return problems


def test_schema_mismatches_reports_each_difference():
    """The comparison itself must catch what it is meant to catch."""
    ours = _fdp(caffe_pb2.DESCRIPTOR)
    fake = descriptor_pb2.FileDescriptorProto()
    fake.CopyFrom(ours)
    fake.package = "caffe"
    for message in fake.message_type:
        for field in message.field:
            if field.type_name.startswith(".mpicaffe."):
                field.type_name = ".caffe." + field.type_name[len(".mpicaffe."):]
    assert schema_mismatches(fake, ours) == []

    by_name = {m.name: m for m in fake.message_type}
    fields = {f.name: f for f in by_name["SolverParameter"].field}
    fields["delta"].default_value = "1e-06"
    fields["weights"].number = 99
    blob = {f.name: f for f in by_name["BlobProto"].field}
    blob["data"].options.ClearField("packed")
    datum = {f.name: f for f in by_name["Datum"].field}
    datum["label"].type = descriptor_pb2.FieldDescriptorProto.TYPE_INT64
    layer = {f.name: f for f in by_name["LayerParameter"].field}
    layer["bottom"].label = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
    by_name["NetParameter"].field.add(name="extra", number=1000, type=9, label=1)
    fake.message_type.add(name="OnlyInCaffe")
    by_name["PoolingParameter"].enum_type[0].value[0].number = 7
    problems = schema_mismatches(fake, ours)
    expected = [
        "SolverParameter.delta: default",
        "SolverParameter.weights: number",
        "BlobProto.data: packed",
        "Datum.label: type",
        "LayerParameter.bottom: label",
        "NetParameter.extra: missing from ours",
        "message OnlyInCaffe: missing from ours",
        "enum PoolingParameter.PoolMethod: value MAX is 0, Caffe has 7",
    ]
    for start in expected:
        assert any(p.startswith(start) for p in problems), (start, problems)
    assert len(problems) == len(expected), problems


def _caffe_proto_source() -> Path | None:
    """Caffe's own caffe.proto, from $MPICAFFE_CAFFE_PROTO or a Caffe build in ~/.cache/mpicaffe."""
    env = os.environ.get("MPICAFFE_CAFFE_PROTO")
    if env:
        return Path(env)
    cache = Path(os.environ.get("MPICAFFE_CACHE", Path.home() / ".cache" / "mpicaffe"))
    found = sorted(glob.glob(str(cache / "caffe-*/share/caffe/caffe.proto")))  # scripts/install_caffe.sh
    return Path(found[0]) if found else None


def _compile(proto: Path, tmp_path: Path) -> descriptor_pb2.FileDescriptorProto:
    # grpcio-tools (test extra) runs protoc
    out = tmp_path / "caffe.pb"
    cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto.parent}",
           f"--descriptor_set_out={out}", str(proto)]
    run = subprocess.run(cmd, check=False, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    return files[-1]


def _assert_same_schema(caffe: descriptor_pb2.FileDescriptorProto, where: str):
    ours = _fdp(caffe_pb2.DESCRIPTOR)
    assert ours.package == "mpicaffe" and caffe.package == "caffe"
    problems = schema_mismatches(caffe, ours)
    assert not problems, f"{len(problems)} difference(s) from {where}:\n  " + "\n  ".join(problems)


def test_schema_matches_pycaffe():
    import_pycaffe()
    try:
        pycaffe_pb2 = importlib.import_module("caffe.proto.caffe_pb2")
    except (TypeError, runtime_version.VersionError) as exc:  # gencode and runtime too far apart
        _missing(f"pycaffe's caffe_pb2 does not load with this protobuf: {exc!r}")
    _assert_same_schema(_fdp(pycaffe_pb2.DESCRIPTOR), f"pycaffe at {pycaffe_pb2.__file__}")


def test_schema_matches_caffe_proto_source(tmp_path):
    source = _caffe_proto_source()
    if source is None or not source.is_file():
        _missing("no Caffe caffe.proto: set MPICAFFE_CAFFE_PROTO or build Caffe under ~/.cache/mpicaffe")
    _assert_same_schema(_compile(source, tmp_path), str(source))


# --------------------------------------------------------------------------- generated module


def _embedded_descriptor(generated_py: Path) -> descriptor_pb2.FileDescriptorProto:
    """The FileDescriptorProto a protoc-generated _pb2 module registers, read without importing it."""
    for node in ast.walk(ast.parse(generated_py.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "AddSerializedFile"):
            return descriptor_pb2.FileDescriptorProto.FromString(ast.literal_eval(node.args[0]))
    raise AssertionError(f"{generated_py} registers no serialized file descriptor")


def test_committed_caffe_pb2_is_up_to_date(tmp_path):
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", f"--python_out={tmp_path}", PROTO_REL]
    run = subprocess.run(cmd, check=False, cwd=REPO_ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    fresh = _embedded_descriptor(tmp_path / "mpicaffe/proto/caffe_pb2.py")
    committed = _embedded_descriptor(REPO_ROOT / "mpicaffe/proto/caffe_pb2.py")
    assert committed.name == PROTO_REL
    assert committed == fresh, "caffe_pb2.py is stale: run scripts/gen_proto.sh"
