"""Legacy net and solver upgrades, checked against what BVLC Caffe (2018 master) produces."""
from __future__ import annotations

import subprocess

import pytest
from google.protobuf import text_format

from mpicaffe import upgrade
from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2
from tests.real_caffe import caffe_tool

SOURCE = "models/legacy.prototxt"


def net(text: str) -> caffe_pb2.NetParameter:
    return text_format.Parse(text, caffe_pb2.NetParameter())


def solver(text: str) -> caffe_pb2.SolverParameter:
    return text_format.Parse(text, caffe_pb2.SolverParameter())


def assert_same(actual, expected) -> None:
    """Compare two messages field by field; on failure pytest shows a readable text diff."""
    assert text_format.MessageToString(actual) == text_format.MessageToString(expected)
    assert actual == expected


def upgraded(text: str) -> caffe_pb2.NetParameter:
    original = net(text)
    result, _ = upgrade.upgrade_net(original, SOURCE)
    assert original == net(text), "upgrade_net must not modify its argument"
    return result


# ---------------------------------------------------------------------------------------------
# V1 -> current

# Every V1LayerParameter.LayerType and the type string Caffe's UpgradeV1LayerType gives it.
EXPECTED_V1_TYPES = {
    "NONE": "", "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL",
    "CONCAT": "Concat", "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution",
    "DECONVOLUTION": "Deconvolution", "DATA": "Data", "DROPOUT": "Dropout", "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise", "EXP": "Exp", "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output", "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData", "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct",
    "LRN": "LRN", "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN", "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence", "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice", "TANH": "TanH",
    "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}


def test_every_v1_layer_type_maps_to_caffes_type_string():
    enum = caffe_pb2.V1LayerParameter.LayerType.DESCRIPTOR
    assert {value.name for value in enum.values} == set(EXPECTED_V1_TYPES)
    for value in enum.values:
        result = upgraded(f'layers {{ name: "l" type: {value.name} bottom: "x" top: "y" }}')
        assert len(result.layer) == 1 and not result.layers
        layer = result.layer[0]
        assert layer.type == EXPECTED_V1_TYPES[value.name], value.name
        assert layer.HasField("type"), "Caffe sets type even when it maps to the empty string"
        assert list(layer.bottom) == ["x"] and list(layer.top) == ["y"]


def test_v1_layer_without_type_gets_no_type():
    result = upgraded('layers { name: "anonymous" }')
    assert not result.layer[0].HasField("type")


V1_LENET = """
name: "LeNet"
state { phase: TEST level: 2 }
force_backward: true
layers {
  name: "mnist" type: DATA top: "data" top: "label"
  data_param { source: "train_lmdb" backend: LMDB batch_size: 64 }
  transform_param { scale: 0.00390625 }
  include { phase: TRAIN }
}
layers {
  name: "mnist" type: DATA top: "data" top: "label"
  data_param { source: "test_lmdb" backend: LMDB batch_size: 100 }
  transform_param { scale: 0.00390625 }
  include { phase: TEST stage: "val" }
}
layers {
  name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1"
  blobs_lr: 1 blobs_lr: 2
  weight_decay: 1 weight_decay: 0
  convolution_param {
    num_output: 20 kernel_size: 5 stride: 1 pad: 2
    weight_filler { type: "xavier" } bias_filler { type: "constant" value: 0.1 }
  }
}
layers {
  name: "pool1" type: POOLING bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 }
}
layers {
  name: "ip1" type: INNER_PRODUCT bottom: "pool1" top: "ip1"
  param: "ip1_w" param: "ip1_b"
  blob_share_mode: STRICT blob_share_mode: PERMISSIVE
  blobs_lr: 1 blobs_lr: 2
  inner_product_param { num_output: 500 weight_filler { type: "xavier" } }
}
layers { name: "relu1" type: RELU bottom: "ip1" top: "ip1" relu_param { negative_slope: 0.1 } }
layers {
  name: "ip2" type: INNER_PRODUCT bottom: "ip1" top: "ip2"
  param: "shared_w"
  weight_decay: 1 weight_decay: 0 weight_decay: 5
  inner_product_param { num_output: 10 }
}
layers {
  name: "drop" type: DROPOUT bottom: "ip2" top: "ip2"
  dropout_param { dropout_ratio: 0.3 }
  exclude { phase: TEST }
  exclude { not_stage: "deploy" min_level: 1 }
}
layers {
  name: "accuracy" type: ACCURACY bottom: "ip2" bottom: "label" top: "accuracy"
  accuracy_param { top_k: 5 }
  include { phase: TEST }
}
layers {
  name: "loss" type: SOFTMAX_LOSS bottom: "ip2" bottom: "label" top: "loss"
  loss_weight: 0.5
  loss_param { ignore_label: 255 normalize: false }
}
"""

CURRENT_LENET = """
name: "LeNet"
state { phase: TEST level: 2 }
force_backward: true
layer {
  name: "mnist" type: "Data" top: "data" top: "label"
  include { phase: TRAIN }
  transform_param { scale: 0.00390625 }
  data_param { source: "train_lmdb" batch_size: 64 backend: LMDB }
}
layer {
  name: "mnist" type: "Data" top: "data" top: "label"
  include { phase: TEST stage: "val" }
  transform_param { scale: 0.00390625 }
  data_param { source: "test_lmdb" batch_size: 100 backend: LMDB }
}
layer {
  name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 decay_mult: 1 }
  param { lr_mult: 2 decay_mult: 0 }
  convolution_param {
    num_output: 20 pad: 2 kernel_size: 5 stride: 1
    weight_filler { type: "xavier" } bias_filler { type: "constant" value: 0.1 }
  }
}
layer {
  name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 }
}
layer {
  name: "ip1" type: "InnerProduct" bottom: "pool1" top: "ip1"
  param { name: "ip1_w" share_mode: STRICT lr_mult: 1 }
  param { name: "ip1_b" share_mode: PERMISSIVE lr_mult: 2 }
  inner_product_param { num_output: 500 weight_filler { type: "xavier" } }
}
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" relu_param { negative_slope: 0.1 } }
layer {
  name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  param { name: "shared_w" decay_mult: 1 }
  param { decay_mult: 0 }
  param { decay_mult: 5 }
  inner_product_param { num_output: 10 }
}
layer {
  name: "drop" type: "Dropout" bottom: "ip2" top: "ip2"
  exclude { phase: TEST }
  exclude { not_stage: "deploy" min_level: 1 }
  dropout_param { dropout_ratio: 0.3 }
}
layer {
  name: "accuracy" type: "Accuracy" bottom: "ip2" bottom: "label" top: "accuracy"
  include { phase: TEST }
  accuracy_param { top_k: 5 }
}
layer {
  name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss"
  loss_weight: 0.5
  loss_param { ignore_label: 255 normalize: false }
}
"""


def test_v1_net_becomes_current_net():
    original = net(V1_LENET)
    assert upgrade.net_needs_upgrade(original)
    result, lines = upgrade.upgrade_net(original, SOURCE)
    assert_same(result, net(CURRENT_LENET))
    assert lines == [
        f"Attempting to upgrade input file specified using deprecated V1LayerParameter: {SOURCE}",
        "Successfully upgraded file specified using deprecated V1LayerParameter",
    ]
    assert not upgrade.net_needs_upgrade(result)


def test_blobs_lr_and_weight_decay_become_lr_mult_and_decay_mult():
    result = upgraded('layers { name: "c" type: CONVOLUTION blobs_lr: 0 blobs_lr: 10 weight_decay: 2 }')
    specs = result.layer[0].param
    assert [(s.lr_mult, s.HasField("decay_mult")) for s in specs] == [(0, True), (10, False)]
    assert specs[0].decay_mult == 2
    assert specs[0].HasField("lr_mult"), "an explicit blobs_lr of 0 must survive as lr_mult: 0"


def _v1_param_fields() -> list[str]:
    fields = caffe_pb2.V1LayerParameter.DESCRIPTOR.fields
    return [f.name for f in fields if f.name.endswith("_param") and f.message_type is not None]


@pytest.mark.parametrize("param_name", _v1_param_fields())
def test_every_v1_per_type_param_is_copied(param_name):
    v1 = net('layers { name: "l" type: NONE }')
    param = getattr(v1.layers[0], param_name)
    param.SetInParent()
    # Give the message some content where it has a settable scalar, so the copy is checked too.
    for field in param.DESCRIPTOR.fields:
        if not field.is_repeated and field.message_type is None and field.enum_type is None:
            if field.type == field.TYPE_BOOL:
                setattr(param, field.name, not field.default_value)
            elif field.type in (field.TYPE_STRING, field.TYPE_BYTES):
                setattr(param, field.name, "x" if field.type == field.TYPE_STRING else b"x")
            else:
                setattr(param, field.name, 7)
            break
    result, _ = upgrade.upgrade_net(v1, SOURCE)
    layer = result.layer[0]
    assert layer.HasField(param_name)
    assert getattr(layer, param_name) == param


def test_v1_blobs_are_kept():
    result = upgraded('layers { name: "ip" type: INNER_PRODUCT blobs { num: 1 channels: 1 height: 1 '
                      'width: 2 data: 0.5 data: -1 } blobs { shape { dim: 1 } data: 3 } }')
    expected = net('layer { name: "ip" type: "InnerProduct" blobs { num: 1 channels: 1 height: 1 width: 2 '
                   'data: 0.5 data: -1 } blobs { shape { dim: 1 } data: 3 } }')
    assert_same(result, expected)


def test_net_with_both_layers_and_layer_is_refused():
    mixed = net('layers { name: "old" type: RELU } layer { name: "new" type: "ReLU" }')
    with pytest.raises(UserError) as error:
        upgrade.upgrade_net(mixed, SOURCE)
    assert SOURCE in str(error.value)
    assert "old" in str(error.value) and "new" in str(error.value)


# ---------------------------------------------------------------------------------------------
# Data transformation fields

def test_transformation_fields_move_to_transform_param():
    original = net("""
        layers { name: "d" type: DATA top: "data"
          data_param { source: "db" batch_size: 32 scale: 0.5 mean_file: "mean.binaryproto"
                       crop_size: 24 mirror: true rand_skip: 3 } }
        layers { name: "i" type: IMAGE_DATA top: "images"
          image_data_param { source: "list.txt" batch_size: 8 scale: 2 crop_size: 100 shuffle: true
                             new_height: 128 new_width: 96 } }
        layers { name: "w" type: WINDOW_DATA top: "windows"
          window_data_param { source: "windows.txt" mean_file: "m" mirror: false fg_threshold: 0.6 } }
        layers { name: "other" type: DUMMY_DATA top: "dummy" }
    """)
    assert upgrade.net_needs_data_upgrade(original)
    result, lines = upgrade.upgrade_net(original, SOURCE)
    expected = net("""
        layer { name: "d" type: "Data" top: "data"
          transform_param { scale: 0.5 mean_file: "mean.binaryproto" crop_size: 24 mirror: true }
          data_param { source: "db" batch_size: 32 rand_skip: 3 } }
        layer { name: "i" type: "ImageData" top: "images"
          transform_param { scale: 2 crop_size: 100 }
          image_data_param { source: "list.txt" batch_size: 8 shuffle: true new_height: 128 new_width: 96 } }
        layer { name: "w" type: "WindowData" top: "windows"
          transform_param { mean_file: "m" mirror: false }
          window_data_param { source: "windows.txt" fg_threshold: 0.6 } }
        layer { name: "other" type: "DummyData" top: "dummy" }
    """)
    assert_same(result, expected)
    assert lines[:3] == [
        f"Attempting to upgrade input file specified using deprecated transformation parameters: {SOURCE}",
        "Successfully upgraded file specified using deprecated data transformation parameters.",
        ("Note that future Caffe releases will only support transform_param messages for transformation "
         "fields."),
    ]
    assert lines[3].startswith("Attempting to upgrade input file specified using deprecated V1LayerParameter")


def test_data_upgrade_leaves_empty_params_on_every_data_layer_it_visits():
    # Caffe's UpgradeNetDataTransformation touches the data param and transform_param of every
    # V1 data layer once any layer needs it; the empty messages show up in the upgraded net.
    result = upgraded("""
        layers { name: "a" type: DATA data_param { source: "db" mirror: true } }
        layers { name: "b" type: IMAGE_DATA }
    """)
    b = result.layer[1]
    assert b.HasField("transform_param") and b.HasField("image_data_param")
    assert b.transform_param == caffe_pb2.TransformationParameter()
    assert not b.HasField("data_param")


def test_data_upgrade_only_looks_at_the_param_of_the_layers_own_type():
    # Deprecated fields on a data param of the wrong layer type are not moved (nor looked at).
    original = net('layers { name: "a" type: DATA image_data_param { scale: 3 } }')
    assert not upgrade.net_needs_data_upgrade(original)
    result, _ = upgrade.upgrade_net(original, SOURCE)
    assert result.layer[0].image_data_param.scale == 3
    assert not result.layer[0].HasField("transform_param")


# ---------------------------------------------------------------------------------------------
# V0 -> V1 -> current

V0_WITH_PADDING = """
name: "CaffeNet"
layers {
  layer { name: "data" type: "data" source: "train-leveldb" meanfile: "mean.binaryproto"
          batchsize: 256 cropsize: 227 mirror: true }
  top: "data" top: "label"
}
layers { layer { name: "pad1" type: "padding" pad: 2 } bottom: "data" top: "pad1" }
layers {
  layer { name: "conv1" type: "conv" num_output: 96 kernelsize: 11 stride: 4
          weight_filler { type: "gaussian" std: 0.01 } bias_filler { type: "constant" value: 0 }
          blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0 }
  bottom: "pad1" top: "conv1"
}
layers { layer { name: "pool1" type: "pool" pool: MAX kernelsize: 3 stride: 2 } bottom: "pad1" top: "pool1" }
layers {
  layer { name: "fc8" type: "innerproduct" num_output: 1000 biasterm: false
          weight_filler { type: "gaussian" std: 0.01 } blobs_lr: 1 weight_decay: 1 }
  bottom: "conv1" top: "fc8"
}
layers { layer { name: "loss" type: "softmax_loss" } bottom: "fc8" bottom: "label" }
"""

V1_FROM_V0 = """
name: "CaffeNet"
layers {
  name: "data" type: DATA top: "data" top: "label"
  data_param { source: "train-leveldb" batch_size: 256 }
  transform_param { mean_file: "mean.binaryproto" crop_size: 227 mirror: true }
}
layers {
  name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1"
  blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
  convolution_param { num_output: 96 pad: 2 kernel_size: 11 stride: 4
    weight_filler { type: "gaussian" std: 0.01 } bias_filler { type: "constant" value: 0 } }
}
layers {
  name: "pool1" type: POOLING bottom: "data" top: "pool1"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 2 }
}
layers {
  name: "fc8" type: INNER_PRODUCT bottom: "conv1" top: "fc8"
  blobs_lr: 1 weight_decay: 1
  inner_product_param { num_output: 1000 bias_term: false weight_filler { type: "gaussian" std: 0.01 } }
}
layers { name: "loss" type: SOFTMAX_LOSS bottom: "fc8" bottom: "label" }
"""

CURRENT_FROM_V0 = """
name: "CaffeNet"
layer {
  name: "data" type: "Data" top: "data" top: "label"
  transform_param { mean_file: "mean.binaryproto" crop_size: 227 mirror: true }
  data_param { source: "train-leveldb" batch_size: 256 }
}
layer {
  name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 decay_mult: 1 }
  param { lr_mult: 2 decay_mult: 0 }
  convolution_param { num_output: 96 pad: 2 kernel_size: 11 stride: 4
    weight_filler { type: "gaussian" std: 0.01 } bias_filler { type: "constant" value: 0 } }
}
layer {
  name: "pool1" type: "Pooling" bottom: "data" top: "pool1"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 2 }
}
layer {
  name: "fc8" type: "InnerProduct" bottom: "conv1" top: "fc8"
  param { lr_mult: 1 decay_mult: 1 }
  inner_product_param { num_output: 1000 bias_term: false weight_filler { type: "gaussian" std: 0.01 } }
}
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc8" bottom: "label" }
"""


def test_v0_padding_layer_is_folded_into_every_consumer():
    merged = upgrade.merge_v0_padding_layers(net(V0_WITH_PADDING), SOURCE)
    names = [entry.layer.name for entry in merged.layers]
    assert names == ["data", "conv1", "pool1", "fc8", "loss"]
    assert [(e.layer.pad, list(e.bottom)) for e in merged.layers[1:3]] == [(2, ["data"]), (2, ["data"])]
    again = upgrade.merge_v0_padding_layers(merged, SOURCE)
    assert_same(again, merged)


def test_v0_net_becomes_v1_net():
    result, problems = upgrade.upgrade_v0_net(net(V0_WITH_PADDING), SOURCE)
    assert problems == []
    assert_same(result, net(V1_FROM_V0))


def test_v0_net_becomes_current_net():
    result, lines = upgrade.upgrade_net(net(V0_WITH_PADDING), SOURCE)
    assert_same(result, net(CURRENT_FROM_V0))
    assert lines[0] == f"Attempting to upgrade input file specified using deprecated V0LayerParameter: {SOURCE}"
    assert lines[1] == "Successfully upgraded file specified using deprecated V0LayerParameter"
    assert lines[2].startswith("Note that future Caffe releases will not support V0NetParameter")
    assert lines[3:] == [
        f"Attempting to upgrade input file specified using deprecated V1LayerParameter: {SOURCE}",
        "Successfully upgraded file specified using deprecated V1LayerParameter",
    ]


def test_every_v0_field_lands_in_the_right_v1_param():
    v0 = net("""
        name: "AllFields"
        input: "extra" input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8
        force_backward: true
        layers { layer { name: "data" type: "data" source: "db" meanfile: "m" batchsize: 10 cropsize: 7
                         mirror: false scale: 0.25 rand_skip: 5 } top: "data" top: "label" }
        layers { layer { name: "images" type: "images" source: "list" batchsize: 4 rand_skip: 2
                         shuffle_images: true new_height: 40 new_width: 30 } top: "img" top: "img_label" }
        layers { layer { name: "windows" type: "window_data" source: "win" batchsize: 16 cropsize: 9
                         det_fg_threshold: 0.25 det_bg_threshold: 0.75 det_fg_fraction: 0.5
                         det_context_pad: 16 det_crop_mode: "square" } top: "win" top: "win_label" }
        layers { layer { name: "h5" type: "hdf5_data" source: "h5list" batchsize: 3 } top: "h5" }
        layers { layer { name: "conv" type: "conv" num_output: 8 biasterm: false pad: 1 kernelsize: 3
                         group: 2 stride: 2 weight_filler { type: "xavier" }
                         bias_filler { type: "constant" value: 3 } } bottom: "data" top: "conv" }
        layers { layer { name: "ave" type: "pool" pool: AVE kernelsize: 3 stride: 2 } bottom: "conv" top: "ave" }
        layers { layer { name: "sto" type: "pool" pool: STOCHASTIC kernelsize: 4 stride: 5 pad: 1 }
                 bottom: "conv" top: "sto" }
        layers { layer { name: "cat" type: "concat" concat_dim: 2 } bottom: "ave" bottom: "sto" top: "cat" }
        layers { layer { name: "norm" type: "lrn" local_size: 5 alpha: 0.0001 beta: 0.75 k: 2 }
                 bottom: "cat" top: "norm" }
        layers { layer { name: "ip" type: "innerproduct" num_output: 10 biasterm: true
                         weight_filler { type: "gaussian" std: 0.005 } bias_filler { type: "constant" } }
                 bottom: "norm" top: "ip" }
        layers { layer { name: "drop" type: "dropout" dropout_ratio: 0.2 } bottom: "ip" top: "ip" }
        layers { layer { name: "info" type: "infogain_loss" source: "H.binaryproto" }
                 bottom: "ip" bottom: "label" }
        layers { layer { name: "out" type: "hdf5_output" hdf5_output_param { file_name: "out.h5" } }
                 bottom: "ip" }
        layers { layer { name: "acc" type: "accuracy" } }
        layers { layer { name: "bnll" type: "bnll" } }
        layers { layer { name: "eucl" type: "euclidean_loss" } }
        layers { layer { name: "flat" type: "flatten" } }
        layers { layer { name: "i2c" type: "im2col" } }
        layers { layer { name: "mll" type: "multinomial_logistic_loss" } }
        layers { layer { name: "relu" type: "relu" } }
        layers { layer { name: "sig" type: "sigmoid" } }
        layers { layer { name: "soft" type: "softmax" } }
        layers { layer { name: "split" type: "split" } }
        layers { layer { name: "tanh" type: "tanh" } }
        layers { layer { name: "sl" type: "softmax_loss" } }
    """)
    expected = net("""
        name: "AllFields"
        input: "extra" input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8
        force_backward: true
        layers { name: "data" type: DATA top: "data" top: "label"
                 data_param { source: "db" batch_size: 10 rand_skip: 5 }
                 transform_param { scale: 0.25 mean_file: "m" crop_size: 7 mirror: false } }
        layers { name: "images" type: IMAGE_DATA top: "img" top: "img_label"
                 image_data_param { source: "list" batch_size: 4 rand_skip: 2 shuffle: true
                                    new_height: 40 new_width: 30 } }
        layers { name: "windows" type: WINDOW_DATA top: "win" top: "win_label"
                 window_data_param { source: "win" batch_size: 16 fg_threshold: 0.25 bg_threshold: 0.75
                                     fg_fraction: 0.5 context_pad: 16 crop_mode: "square" }
                 transform_param { crop_size: 9 } }
        layers { name: "h5" type: HDF5_DATA top: "h5" hdf5_data_param { source: "h5list" batch_size: 3 } }
        layers { name: "conv" type: CONVOLUTION bottom: "data" top: "conv"
                 convolution_param { num_output: 8 bias_term: false pad: 1 kernel_size: 3 group: 2
                                     stride: 2 weight_filler { type: "xavier" }
                                     bias_filler { type: "constant" value: 3 } } }
        layers { name: "ave" type: POOLING bottom: "conv" top: "ave"
                 pooling_param { pool: AVE kernel_size: 3 stride: 2 } }
        layers { name: "sto" type: POOLING bottom: "conv" top: "sto"
                 pooling_param { pool: STOCHASTIC kernel_size: 4 stride: 5 pad: 1 } }
        layers { name: "cat" type: CONCAT bottom: "ave" bottom: "sto" top: "cat"
                 concat_param { concat_dim: 2 } }
        layers { name: "norm" type: LRN bottom: "cat" top: "norm"
                 lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 k: 2 } }
        layers { name: "ip" type: INNER_PRODUCT bottom: "norm" top: "ip"
                 inner_product_param { num_output: 10 bias_term: true
                                       weight_filler { type: "gaussian" std: 0.005 }
                                       bias_filler { type: "constant" } } }
        layers { name: "drop" type: DROPOUT bottom: "ip" top: "ip" dropout_param { dropout_ratio: 0.2 } }
        layers { name: "info" type: INFOGAIN_LOSS bottom: "ip" bottom: "label"
                 infogain_loss_param { source: "H.binaryproto" } }
        layers { name: "out" type: HDF5_OUTPUT bottom: "ip" hdf5_output_param { file_name: "out.h5" } }
        layers { name: "acc" type: ACCURACY }
        layers { name: "bnll" type: BNLL }
        layers { name: "eucl" type: EUCLIDEAN_LOSS }
        layers { name: "flat" type: FLATTEN }
        layers { name: "i2c" type: IM2COL }
        layers { name: "mll" type: MULTINOMIAL_LOGISTIC_LOSS }
        layers { name: "relu" type: RELU }
        layers { name: "sig" type: SIGMOID }
        layers { name: "soft" type: SOFTMAX }
        layers { name: "split" type: SPLIT }
        layers { name: "tanh" type: TANH }
        layers { name: "sl" type: SOFTMAX_LOSS }
    """)
    result, problems = upgrade.upgrade_v0_net(v0, SOURCE)
    assert problems == []
    assert_same(result, expected)


def test_v0_net_keeps_only_the_net_fields_caffe_keeps():
    v0 = net("""
        name: "n" debug_info: true state { phase: TEST }
        input: "x" input_shape { dim: 2 }
        layers { layer { name: "r" type: "relu" } bottom: "x" top: "y" }
    """)
    result, _ = upgrade.upgrade_v0_net(v0, SOURCE)
    assert_same(result, net('name: "n" input: "x" layers { name: "r" type: RELU bottom: "x" top: "y" }'))


def test_v0_field_meaningless_for_its_type_is_dropped_with_caffes_error():
    v0 = net("""
        layers { layer { name: "r" type: "relu" num_output: 3 kernelsize: 2 } bottom: "x" top: "y" }
        input: "x"
    """)
    result, lines = upgrade.upgrade_net(v0, SOURCE)
    assert len(result.layer) == 1, "an input without dims is dropped, not turned into a layer"
    relu = result.layer[0]
    assert relu == text_format.Parse('name: "r" type: "ReLU" bottom: "x" top: "y"', caffe_pb2.LayerParameter())
    problems = [line for line in lines if line.startswith("Unknown parameter")]
    assert len(problems) == 2
    assert "num_output" in problems[0] and "relu" in problems[0] and "'r'" in problems[0]
    assert "kernelsize" in problems[1]
    assert ("Warning: had one or more problems upgrading V0NetParameter to NetParameter (see above); "
            "continuing anyway.") in lines
    assert "Successfully upgraded file specified using deprecated V0LayerParameter" not in lines


def test_unknown_v0_type_is_refused():
    with pytest.raises(UserError) as error:
        upgrade.upgrade_net(net('layers { layer { name: "odd" type: "warp" } }'), SOURCE)
    assert SOURCE in str(error.value) and "'odd'" in str(error.value) and "warp" in str(error.value)


PAD_INTO_RELU = """
    input: "x"
    layers { layer { name: "p" type: "padding" pad: 1 } bottom: "x" top: "p" }
    layers { layer { name: "r" type: "relu" } bottom: "p" top: "r" }
"""
PAD_INTO_TWO_INPUT_CONV = """
    input: "x" input: "z"
    layers { layer { name: "p" type: "padding" pad: 1 } bottom: "x" top: "p" }
    layers { layer { name: "c" type: "conv" } bottom: "p" bottom: "z" top: "c" }
"""
PAD_WITH_TWO_INPUTS = """
    input: "x" input: "z"
    layers { layer { name: "p" type: "padding" pad: 1 } bottom: "x" bottom: "z" top: "p" }
    layers { layer { name: "c" type: "conv" } bottom: "p" top: "c" }
"""


@pytest.mark.parametrize("text, words", [
    ('layers { layer { name: "c" type: "conv" } bottom: "nowhere" top: "c" }', ["'c'", "nowhere"]),
    (PAD_INTO_RELU, ["'p'", "'r'", "relu"]),
    (PAD_INTO_TWO_INPUT_CONV, ["'c'", "'p'"]),
    (PAD_WITH_TWO_INPUTS, ["'p'"]),
])
def test_impossible_v0_padding_is_refused(text, words):
    with pytest.raises(UserError) as error:
        upgrade.upgrade_net(net(text), SOURCE)
    assert SOURCE in str(error.value)
    for word in words:
        assert word in str(error.value)


def test_v0_layer_types_map_like_caffes():
    expected = {
        "accuracy": "ACCURACY", "bnll": "BNLL", "concat": "CONCAT", "conv": "CONVOLUTION", "data": "DATA",
        "dropout": "DROPOUT", "euclidean_loss": "EUCLIDEAN_LOSS", "flatten": "FLATTEN",
        "hdf5_data": "HDF5_DATA", "hdf5_output": "HDF5_OUTPUT", "im2col": "IM2COL", "images": "IMAGE_DATA",
        "infogain_loss": "INFOGAIN_LOSS", "innerproduct": "INNER_PRODUCT", "lrn": "LRN",
        "multinomial_logistic_loss": "MULTINOMIAL_LOGISTIC_LOSS", "pool": "POOLING", "relu": "RELU",
        "sigmoid": "SIGMOID", "softmax": "SOFTMAX", "softmax_loss": "SOFTMAX_LOSS", "split": "SPLIT",
        "tanh": "TANH", "window_data": "WINDOW_DATA",
    }
    for v0_type, v1_name in expected.items():
        value = upgrade.v0_layer_type_to_v1(v0_type)
        assert caffe_pb2.V1LayerParameter.LayerType.Name(value) == v1_name
    with pytest.raises(UserError):
        upgrade.v0_layer_type_to_v1("padding")


# ---------------------------------------------------------------------------------------------
# Deprecated net inputs

def test_input_dims_become_a_first_input_layer():
    original = net("""
        name: "deploy"
        input: "data" input_dim: 10 input_dim: 3 input_dim: 227 input_dim: 227
        input: "rois" input_dim: 1 input_dim: 5 input_dim: 1 input_dim: 1
        layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" }
    """)
    result, lines = upgrade.upgrade_net(original, SOURCE)
    expected = net("""
        name: "deploy"
        layer { name: "input" type: "Input" top: "data" top: "rois"
                input_param { shape { dim: 10 dim: 3 dim: 227 dim: 227 } shape { dim: 1 dim: 5 dim: 1 dim: 1 } } }
        layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" }
    """)
    assert_same(result, expected)
    assert lines == [
        f"Attempting to upgrade input file specified using deprecated input fields: {SOURCE}",
        "Successfully upgraded file specified using deprecated input fields.",
        "Note that future Caffe releases will only support input layers and not input fields.",
    ]


def test_input_shapes_become_a_first_input_layer():
    result = upgraded("""
        input: "a" input_shape { dim: 2 dim: 7 }
        input: "b" input_shape { dim: 4 }
        layer { name: "one" type: "ReLU" bottom: "a" top: "a" }
        layer { name: "two" type: "ReLU" bottom: "b" top: "b" }
    """)
    expected = net("""
        layer { name: "input" type: "Input" top: "a" top: "b"
                input_param { shape { dim: 2 dim: 7 } shape { dim: 4 } } }
        layer { name: "one" type: "ReLU" bottom: "a" top: "a" }
        layer { name: "two" type: "ReLU" bottom: "b" top: "b" }
    """)
    assert_same(result, expected)


def test_input_without_dims_is_dropped():
    # A legacy .caffemodel names its inputs but carries no shapes: Caffe just strips them.
    result = upgraded('input: "data" layer { name: "r" type: "ReLU" bottom: "data" top: "r" }')
    assert_same(result, net('layer { name: "r" type: "ReLU" bottom: "data" top: "r" }'))


def test_v1_deploy_net_with_inputs_is_upgraded_in_caffes_order():
    original = net("""
        name: "VGG"
        input: "data" input_dim: 1 input_dim: 3 input_dim: 224 input_dim: 224
        layers { name: "conv1_1" type: CONVOLUTION bottom: "data" top: "conv1_1"
                 convolution_param { num_output: 64 pad: 1 kernel_size: 3 } }
        layers { name: "prob" type: SOFTMAX bottom: "conv1_1" top: "prob" }
    """)
    result, lines = upgrade.upgrade_net(original, SOURCE)
    expected = net("""
        name: "VGG"
        layer { name: "input" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 224 dim: 224 } } }
        layer { name: "conv1_1" type: "Convolution" bottom: "data" top: "conv1_1"
                convolution_param { num_output: 64 pad: 1 kernel_size: 3 } }
        layer { name: "prob" type: "Softmax" bottom: "conv1_1" top: "prob" }
    """)
    assert_same(result, expected)
    assert [line.split(":")[0] for line in lines if line.startswith("Attempting")] == [
        "Attempting to upgrade input file specified using deprecated V1LayerParameter",
        "Attempting to upgrade input file specified using deprecated input fields",
    ]


@pytest.mark.parametrize("text", [
    'input: "a" input: "b" input_dim: 1 input_dim: 2 input_dim: 3 input_dim: 4',
    'input: "a" input: "b" input_shape { dim: 1 }',
])
def test_too_few_input_dims_are_refused(text):
    with pytest.raises(UserError) as error:
        upgrade.upgrade_net(net(text), SOURCE)
    assert SOURCE in str(error.value)


# ---------------------------------------------------------------------------------------------
# BatchNorm

def test_batch_norm_with_three_param_specs_gets_zero_learning_rates():
    original = net("""
        layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x"
                param { lr_mult: 1 decay_mult: 1 name: "bn_mean" }
                param { lr_mult: 0 }
                param { name: "bn_factor" share_mode: PERMISSIVE }
                batch_norm_param { use_global_stats: false } }
        layer { name: "bn2" type: "BatchNorm" bottom: "x" top: "y" param { lr_mult: 1 } }
        layer { name: "conv" type: "Convolution" bottom: "y" top: "z"
                param { lr_mult: 1 } param { lr_mult: 2 } param { lr_mult: 3 } }
    """)
    assert upgrade.net_needs_batch_norm_upgrade(original)
    result, lines = upgrade.upgrade_net(original, SOURCE)
    expected = net("""
        layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x"
                param { name: "bn_mean" lr_mult: 0 decay_mult: 0 }
                param { lr_mult: 0 decay_mult: 0 }
                param { name: "bn_factor" share_mode: PERMISSIVE lr_mult: 0 decay_mult: 0 }
                batch_norm_param { use_global_stats: false } }
        layer { name: "bn2" type: "BatchNorm" bottom: "x" top: "y" param { lr_mult: 1 } }
        layer { name: "conv" type: "Convolution" bottom: "y" top: "z"
                param { lr_mult: 1 } param { lr_mult: 2 } param { lr_mult: 3 } }
    """)
    assert_same(result, expected)
    assert lines == [
        f"Attempting to upgrade batch norm layers using deprecated params: {SOURCE}",
        "Successfully upgraded batch norm layers using deprecated params.",
    ]
    # As in Caffe, three specs still count as "needs upgrade" afterwards; upgrading again is a no-op.
    assert upgrade.net_needs_upgrade(result)
    assert_same(upgrade.upgrade_net(result, SOURCE)[0], result)


def test_batch_norm_without_three_specs_needs_no_upgrade():
    assert not upgrade.net_needs_upgrade(net('layer { name: "bn" type: "BatchNorm" }'))
    assert not upgrade.net_needs_upgrade(net('layer { name: "bn" type: "BatchNorm" param {} param {} }'))


# ---------------------------------------------------------------------------------------------
# Nets that need nothing

def test_current_net_is_returned_unchanged_without_log_lines():
    current = net(CURRENT_LENET)
    assert not upgrade.net_needs_upgrade(current)
    result, lines = upgrade.upgrade_net(current, SOURCE)
    assert_same(result, current)
    assert lines == []
    assert result is not current


# ---------------------------------------------------------------------------------------------
# Solvers

EXPECTED_SOLVER_TYPES = {"SGD": "SGD", "NESTEROV": "Nesterov", "ADAGRAD": "AdaGrad", "RMSPROP": "RMSProp",
                         "ADADELTA": "AdaDelta", "ADAM": "Adam"}


@pytest.mark.parametrize("enum_name", [v.name for v in caffe_pb2.SolverParameter.SolverType.DESCRIPTOR.values])
def test_solver_type_enum_becomes_type_string(enum_name):
    original = solver(f'net: "train.prototxt" base_lr: 0.01 solver_type: {enum_name}')
    assert upgrade.solver_needs_upgrade(original)
    result, lines = upgrade.upgrade_solver(original, "solver.prototxt")
    expected = solver(f'net: "train.prototxt" base_lr: 0.01 type: "{EXPECTED_SOLVER_TYPES[enum_name]}"')
    assert_same(result, expected)
    assert not result.HasField("solver_type")
    assert original.HasField("solver_type"), "upgrade_solver must not modify its argument"
    assert lines[0] == ("Attempting to upgrade input file specified using deprecated 'solver_type' field "
                        "(enum)': solver.prototxt")
    assert lines[1] == ("Successfully upgraded file specified using deprecated 'solver_type' field (enum) "
                        "to 'type' field (string).")


def test_every_solver_type_enum_value_is_mapped():
    names = {v.name for v in caffe_pb2.SolverParameter.SolverType.DESCRIPTOR.values}
    assert names == set(EXPECTED_SOLVER_TYPES)


@pytest.mark.parametrize("text", ['solver_type: ADAM type: "SGD"', 'solver_type: ADAM type: "Adam"'])
def test_solver_type_and_type_together_are_refused(text):
    with pytest.raises(UserError) as error:
        upgrade.upgrade_solver(solver(text), "solver.prototxt")
    assert "solver.prototxt" in str(error.value)


def test_current_solver_is_returned_unchanged():
    current = solver('net: "n" type: "Adam" momentum: 0.9 momentum2: 0.999')
    assert not upgrade.solver_needs_upgrade(current)
    result, lines = upgrade.upgrade_solver(current, "solver.prototxt")
    assert_same(result, current)
    assert lines == []


# ---------------------------------------------------------------------------------------------
# Against Caffe's own upgrade tool, where one is installed

@pytest.mark.parametrize("text", [V1_LENET, V0_WITH_PADDING, """
    input: "data" input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8
    layers { name: "d" type: DATA top: "x" data_param { source: "db" scale: 0.5 crop_size: 4 } }
    layers { name: "c" type: CONVOLUTION bottom: "data" top: "c" blobs_lr: 1 weight_decay: 0
             convolution_param { num_output: 2 kernel_size: 3 } }
""", """
    layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x" param { name: "m" } param {} param {} }
"""], ids=["v1", "v0", "v1-data-input", "batchnorm"])
def test_matches_caffes_upgrade_net_proto_text(text, tmp_path):
    tool = caffe_tool("upgrade_net_proto_text")
    source = tmp_path / "legacy.prototxt"
    target = tmp_path / "upgraded.prototxt"
    source.write_text(text)
    subprocess.run([tool, str(source), str(target)], check=True, capture_output=True, timeout=60)
    theirs = text_format.Parse(target.read_text(), caffe_pb2.NetParameter())
    ours, _ = upgrade.upgrade_net(net(text), str(source))
    assert_same(ours, theirs)
