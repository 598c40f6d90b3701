"""Caffe's legacy-format upgrades of nets and solvers, as pure functions on protobuf messages.

Caffe upgrades old net and solver definitions when it reads them (BVLC Caffe, 2018 master,
src/caffe/util/upgrade_proto.cpp). This module does the same, step by step and in the same order:

============================================  ====================================================
here                                          Caffe
============================================  ====================================================
``net_needs_upgrade``                         ``NetNeedsUpgrade``
``upgrade_net``                               ``UpgradeNetAsNeeded``
``net_needs_v0_to_v1_upgrade``                ``NetNeedsV0ToV1Upgrade``
``upgrade_v0_net``                            ``UpgradeV0Net``
``merge_v0_padding_layers``                   ``UpgradeV0PaddingLayers``
``upgrade_v0_layer``                          ``UpgradeV0LayerParameter``
``v0_layer_type_to_v1``                       ``UpgradeV0LayerType``
``net_needs_data_upgrade``                    ``NetNeedsDataUpgrade``
``upgrade_data_transformation``               ``UpgradeNetDataTransformation``
``net_needs_v1_to_v2_upgrade``                ``NetNeedsV1ToV2Upgrade``
``upgrade_v1_net``                            ``UpgradeV1Net``
``upgrade_v1_layer``                          ``UpgradeV1LayerParameter``
``v1_layer_type_name``                        ``UpgradeV1LayerType``
``net_needs_input_upgrade``                   ``NetNeedsInputUpgrade``
``upgrade_input``                             ``UpgradeNetInput``
``net_needs_batch_norm_upgrade``              ``NetNeedsBatchNormUpgrade``
``upgrade_batch_norm``                        ``UpgradeNetBatchNorm``
``solver_needs_upgrade``                      ``SolverNeedsTypeUpgrade``
``upgrade_solver``                            ``UpgradeSolverAsNeeded`` / ``UpgradeSolverType``
============================================  ====================================================

The V0 steps live in mpicaffe.upgrade_v0 and are imported here, so that every function of the
table can be reached as ``mpicaffe.upgrade.<name>``.

No function changes its argument: each returns an upgraded copy. Where Caffe logs an error and
carries on (a V0 field that means nothing for its layer type, say), the message is returned among
the log lines and the upgrade goes on; where Caffe aborts (``LOG(FATAL)``, a failed ``CHECK``),
``UserError`` is raised, naming the file and the layer.
"""
from __future__ import annotations

from google.protobuf.message import Message

from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2
from mpicaffe.upgrade_v0 import (
    merge_v0_padding_layers,
    net_needs_v0_to_v1_upgrade,
    upgrade_v0_layer,
    upgrade_v0_net,
    v0_layer_type_to_v1,
)

__all__ = [
    "SOLVER_TYPE_NAMES", "V1_LAYER_TYPE_NAMES", "merge_v0_padding_layers", "net_needs_batch_norm_upgrade",
    "net_needs_data_upgrade", "net_needs_input_upgrade", "net_needs_upgrade", "net_needs_v0_to_v1_upgrade",
    "net_needs_v1_to_v2_upgrade", "solver_needs_upgrade", "upgrade_batch_norm", "upgrade_data_transformation",
    "upgrade_input", "upgrade_net", "upgrade_solver", "upgrade_v0_layer", "upgrade_v0_net", "upgrade_v1_layer",
    "upgrade_v1_net", "v0_layer_type_to_v1", "v1_layer_type_name",
]

NetParameter = caffe_pb2.NetParameter
SolverParameter = caffe_pb2.SolverParameter
V1LayerParameter = caffe_pb2.V1LayerParameter


def _copy(message: Message) -> Message:
    duplicate = type(message)()
    duplicate.CopyFrom(message)
    return duplicate


# ----------------------------------------------------------------------------------------------
# Data transformation: scale/mean_file/crop_size/mirror move from the data params to transform_param

_DATA_PARAM_OF_V1_TYPE = {
    V1LayerParameter.DATA: "data_param",
    V1LayerParameter.IMAGE_DATA: "image_data_param",
    V1LayerParameter.WINDOW_DATA: "window_data_param",
}
_MOVED_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")


def net_needs_data_upgrade(net: NetParameter) -> bool:
    """True if a V1 data layer keeps transformation fields in its own param (NetNeedsDataUpgrade)."""
    for layer in net.layers:
        param_name = _DATA_PARAM_OF_V1_TYPE.get(layer.type)
        if param_name is None:
            continue
        param = getattr(layer, param_name)
        if any(param.HasField(field) for field in _MOVED_TRANSFORM_FIELDS):
            return True
    return False


def upgrade_data_transformation(net: NetParameter) -> NetParameter:
    """Move transformation fields of V1 Data/ImageData/WindowData layers into transform_param.

    Mirrors Caffe's UpgradeNetDataTransformation, which also leaves an (empty) data param and
    transform_param on every such layer it visits.
    """
    upgraded = _copy(net)
    for layer in upgraded.layers:
        param_name = _DATA_PARAM_OF_V1_TYPE.get(layer.type)
        if param_name is None:
            continue
        param = getattr(layer, param_name)
        param.SetInParent()
        layer.transform_param.SetInParent()
        for field in _MOVED_TRANSFORM_FIELDS:
            if param.HasField(field):
                setattr(layer.transform_param, field, getattr(param, field))
                param.ClearField(field)
    return upgraded


# ----------------------------------------------------------------------------------------------
# V1 -> current: `layers { type: ENUM blobs_lr ... }` becomes `layer { type: "String" param {...} }`

V1_LAYER_TYPE_NAMES: dict[str, str] = {
    "NONE": "",
    "ABSVAL": "AbsVal",
    "ACCURACY": "Accuracy",
    "ARGMAX": "ArgMax",
    "BNLL": "BNLL",
    "CONCAT": "Concat",
    "CONTRASTIVE_LOSS": "ContrastiveLoss",
    "CONVOLUTION": "Convolution",
    "DECONVOLUTION": "Deconvolution",
    "DATA": "Data",
    "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss",
    "ELTWISE": "Eltwise",
    "EXP": "Exp",
    "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data",
    "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss",
    "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss",
    "INNER_PRODUCT": "InnerProduct",
    "LRN": "LRN",
    "MEMORY_DATA": "MemoryData",
    "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN",
    "POOLING": "Pooling",
    "POWER": "Power",
    "RELU": "ReLU",
    "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss",
    "SILENCE": "Silence",
    "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss",
    "SPLIT": "Split",
    "SLICE": "Slice",
    "TANH": "TanH",
    "WINDOW_DATA": "WindowData",
    "THRESHOLD": "Threshold",
}
"""V1LayerParameter.LayerType name -> current layer type string, as UpgradeV1LayerType maps it."""

# The per-type parameter messages UpgradeV1LayerParameter carries over unchanged.
_V1_COPIED_PARAMS = (
    "accuracy_param", "argmax_param", "concat_param", "contrastive_loss_param", "convolution_param",
    "data_param", "dropout_param", "dummy_data_param", "eltwise_param", "exp_param", "hdf5_data_param",
    "hdf5_output_param", "hinge_loss_param", "image_data_param", "infogain_loss_param",
    "inner_product_param", "lrn_param", "memory_data_param", "mvn_param", "pooling_param",
    "power_param", "relu_param", "sigmoid_param", "softmax_param", "slice_param", "tanh_param",
    "threshold_param", "window_data_param", "transform_param", "loss_param",
)


def net_needs_v1_to_v2_upgrade(net: NetParameter) -> bool:
    """True if the net still uses the deprecated `layers` field (NetNeedsV1ToV2Upgrade)."""
    return len(net.layers) > 0


def v1_layer_type_name(v1_type: int, source: str = "<net>", layer_name: str = "") -> str:
    """The current layer type string for a V1LayerParameter.LayerType value (UpgradeV1LayerType)."""
    try:
        return V1_LAYER_TYPE_NAMES[V1LayerParameter.LayerType.Name(v1_type)]
    except (KeyError, ValueError):
        raise UserError(f"{source}: layer '{layer_name}' has V1 layer type {v1_type}, "
                        "which has no current equivalent") from None


def _param_spec(layer: caffe_pb2.LayerParameter, index: int) -> caffe_pb2.ParamSpec:
    while len(layer.param) <= index:
        layer.param.add()
    return layer.param[index]


def upgrade_v1_layer(v1: V1LayerParameter, source: str = "<net>") -> tuple[caffe_pb2.LayerParameter, list[str]]:
    """Turn one V1 `layers` entry into a current `layer`; returns it and any problems.

    Mirrors Caffe's UpgradeV1LayerParameter: the enum type becomes a string; the parallel lists
    `param` (names), `blob_share_mode`, `blobs_lr` and `weight_decay` become one ParamSpec per
    parameter blob (name, share_mode, lr_mult, decay_mult); include/exclude rules, loss_weight,
    blobs and every per-type parameter message are copied.
    """
    layer = caffe_pb2.LayerParameter()
    problems: list[str] = []
    layer.bottom.extend(v1.bottom)
    layer.top.extend(v1.top)
    if v1.HasField("name"):
        layer.name = v1.name
    for rule in v1.include:
        layer.include.add().CopyFrom(rule)
    for rule in v1.exclude:
        layer.exclude.add().CopyFrom(rule)
    if v1.HasField("type"):
        layer.type = v1_layer_type_name(v1.type, source, v1.name)
    for blob in v1.blobs:
        layer.blobs.add().CopyFrom(blob)
    for i, name in enumerate(v1.param):
        _param_spec(layer, i).name = name
    for i, mode in enumerate(v1.blob_share_mode):
        try:
            mode_name = V1LayerParameter.DimCheckMode.Name(mode)
            _param_spec(layer, i).share_mode = caffe_pb2.ParamSpec.DimCheckMode.Value(mode_name)
        except ValueError:
            raise UserError(f"{source}: layer '{v1.name}' has unknown blob_share_mode {mode}") from None
    for i, lr in enumerate(v1.blobs_lr):
        _param_spec(layer, i).lr_mult = lr
    for i, decay in enumerate(v1.weight_decay):
        _param_spec(layer, i).decay_mult = decay
    layer.loss_weight.extend(v1.loss_weight)
    for param_name in _V1_COPIED_PARAMS:
        if v1.HasField(param_name):
            getattr(layer, param_name).CopyFrom(getattr(v1, param_name))
    if v1.HasField("layer"):
        problems.append(f"Input NetParameter has V0 layer -- ignoring (layer '{v1.name}')")
    return layer, problems


def upgrade_v1_net(net: NetParameter, source: str = "<net>") -> tuple[NetParameter, list[str]]:
    """Replace the deprecated `layers` by `layer`; returns the net and any problems (UpgradeV1Net).

    A net that has both `layers` and `layer` cannot be upgraded: UserError, as Caffe refuses too.
    All other net-level fields are kept.
    """
    if len(net.layer) > 0:
        first_new = net.layer[0].name or net.layer[0].type
        first_old = net.layers[0].name
        raise UserError(
            f"{source}: the net mixes the deprecated 'layers' field (V1, e.g. layer '{first_old}') with "
            f"the current 'layer' field (e.g. layer '{first_new}'); Caffe refuses to upgrade it. Rewrite "
            "every 'layers { type: ENUM ... }' as 'layer { type: \"String\" ... }' by hand.")
    upgraded = _copy(net)
    upgraded.ClearField("layers")
    upgraded.ClearField("layer")
    problems: list[str] = []
    for i, v1 in enumerate(net.layers):
        layer, layer_problems = upgrade_v1_layer(v1, source)
        upgraded.layer.add().CopyFrom(layer)
        if layer_problems:
            problems.extend(layer_problems)
            problems.append(f"Upgrade of input layer {i} failed.")
    return upgraded, problems


# ----------------------------------------------------------------------------------------------
# Net inputs: `input` + `input_dim`/`input_shape` become a first layer of type "Input"

def net_needs_input_upgrade(net: NetParameter) -> bool:
    """True if the net declares deprecated `input` fields (NetNeedsInputUpgrade)."""
    return len(net.input) > 0


def upgrade_input(net: NetParameter, source: str = "<net>") -> NetParameter:
    """Replace `input` with `input_shape` or `input_dim` (4 per input) by an "Input" layer named
    "input", placed first; mirrors Caffe's UpgradeNetInput.

    With neither shapes nor dims (a legacy .caffemodel) the inputs are simply dropped. Too few
    shapes or dims for the inputs raise UserError (Caffe reads past the end).
    """
    upgraded = _copy(net)
    has_shape = len(net.input_shape) > 0
    has_dim = len(net.input_dim) > 0
    if has_shape or has_dim:
        if has_shape and len(net.input_shape) < len(net.input):
            raise UserError(f"{source}: {len(net.input)} net inputs but only {len(net.input_shape)} "
                            "input_shape entries")
        if not has_shape and len(net.input_dim) < 4 * len(net.input):
            raise UserError(f"{source}: {len(net.input)} net inputs need {4 * len(net.input)} input_dim "
                            f"values (4 each), found {len(net.input_dim)}")
        input_layer = caffe_pb2.LayerParameter(name="input", type="Input")
        input_layer.input_param.SetInParent()
        for i, blob in enumerate(net.input):
            input_layer.top.append(blob)
            shape = input_layer.input_param.shape.add()
            if has_shape:
                shape.CopyFrom(net.input_shape[i])
            else:
                shape.dim.extend(net.input_dim[4 * i:4 * i + 4])
        layers = [input_layer, *upgraded.layer]
        del upgraded.layer[:]
        for layer in layers:
            upgraded.layer.add().CopyFrom(layer)
    upgraded.ClearField("input")
    upgraded.ClearField("input_shape")
    upgraded.ClearField("input_dim")
    return upgraded


# ----------------------------------------------------------------------------------------------
# BatchNorm: the old definition declared three param specs for the statistics blobs

def _is_old_batch_norm(layer: caffe_pb2.LayerParameter) -> bool:
    return layer.type == "BatchNorm" and len(layer.param) == 3


def net_needs_batch_norm_upgrade(net: NetParameter) -> bool:
    """True if a BatchNorm layer declares exactly three param specs (NetNeedsBatchNormUpgrade)."""
    return any(_is_old_batch_norm(layer) for layer in net.layer)


def upgrade_batch_norm(net: NetParameter) -> NetParameter:
    """Zero lr_mult and decay_mult of the three param specs of every such BatchNorm layer.

    Caffe's UpgradeNetBatchNorm keeps the specs (their names still share statistics between
    layers) since BVLC/caffe#5184 (2017); before that it cleared them.
    """
    upgraded = _copy(net)
    for layer in upgraded.layer:
        if _is_old_batch_norm(layer):
            for spec in layer.param:
                spec.lr_mult = 0.0
                spec.decay_mult = 0.0
    return upgraded


# ----------------------------------------------------------------------------------------------
# The whole net upgrade, in Caffe's order

def net_needs_upgrade(net: NetParameter) -> bool:
    """True if `upgrade_net` would change anything in `net` (Caffe's NetNeedsUpgrade)."""
    return (net_needs_v0_to_v1_upgrade(net) or net_needs_v1_to_v2_upgrade(net)
            or net_needs_data_upgrade(net) or net_needs_input_upgrade(net)
            or net_needs_batch_norm_upgrade(net))


def upgrade_net(net: NetParameter, source: str) -> tuple[NetParameter, list[str]]:
    """Upgrade a net from any legacy format to the current one, as Caffe's UpgradeNetAsNeeded does.

    Args:
        net: the parsed NetParameter; it is not modified.
        source: the file it came from, named in log lines and errors.

    Returns:
        The upgraded copy and the log lines Caffe would print (for the caller to print); a net
        that needs nothing comes back equal to `net`, with no lines.

    Raises:
        UserError: where Caffe would abort: unknown V0 layer type, badly placed V0 padding layer,
        both `layers` and `layer` present, too few input dims or shapes.
    """
    lines: list[str] = []
    upgraded = _copy(net)
    if net_needs_v0_to_v1_upgrade(upgraded):
        lines.append(f"Attempting to upgrade input file specified using deprecated V0LayerParameter: {source}")
        upgraded, problems = upgrade_v0_net(upgraded, source)
        lines.extend(problems)
        if problems:
            lines.append("Warning: had one or more problems upgrading V0NetParameter to NetParameter "
                         "(see above); continuing anyway.")
        else:
            lines.append("Successfully upgraded file specified using deprecated V0LayerParameter")
        lines.append("Note that future Caffe releases will not support V0NetParameter; upgrade net "
                     "definitions with Caffe's upgrade_net_proto_text (and weights with "
                     "upgrade_net_proto_binary).")
    if net_needs_data_upgrade(upgraded):
        lines.append("Attempting to upgrade input file specified using deprecated transformation "
                     f"parameters: {source}")
        upgraded = upgrade_data_transformation(upgraded)
        lines.append("Successfully upgraded file specified using deprecated data transformation parameters.")
        lines.append("Note that future Caffe releases will only support transform_param messages for "
                     "transformation fields.")
    if net_needs_v1_to_v2_upgrade(upgraded):
        lines.append(f"Attempting to upgrade input file specified using deprecated V1LayerParameter: {source}")
        upgraded, problems = upgrade_v1_net(upgraded, source)
        lines.extend(problems)
        if problems:
            lines.append("Warning: had one or more problems upgrading V1LayerParameter (see above); "
                         "continuing anyway.")
        else:
            lines.append("Successfully upgraded file specified using deprecated V1LayerParameter")
    if net_needs_input_upgrade(upgraded):
        lines.append(f"Attempting to upgrade input file specified using deprecated input fields: {source}")
        upgraded = upgrade_input(upgraded, source)
        lines.append("Successfully upgraded file specified using deprecated input fields.")
        lines.append("Note that future Caffe releases will only support input layers and not input fields.")
    if net_needs_batch_norm_upgrade(upgraded):
        lines.append(f"Attempting to upgrade batch norm layers using deprecated params: {source}")
        upgraded = upgrade_batch_norm(upgraded)
        lines.append("Successfully upgraded batch norm layers using deprecated params.")
    return upgraded, lines


# ----------------------------------------------------------------------------------------------
# Solver: the deprecated `solver_type` enum becomes the `type` string

SOLVER_TYPE_NAMES: dict[str, str] = {
    "SGD": "SGD",
    "NESTEROV": "Nesterov",
    "ADAGRAD": "AdaGrad",
    "RMSPROP": "RMSProp",
    "ADADELTA": "AdaDelta",
    "ADAM": "Adam",
}
"""SolverParameter.SolverType name -> solver `type` string, as UpgradeSolverType maps it."""


def solver_needs_upgrade(solver: SolverParameter) -> bool:
    """True if the deprecated `solver_type` enum is set (Caffe's SolverNeedsTypeUpgrade)."""
    return solver.HasField("solver_type")


def upgrade_solver(solver: SolverParameter, source: str) -> tuple[SolverParameter, list[str]]:
    """Replace `solver_type` by the `type` string, as Caffe's UpgradeSolverAsNeeded does.

    Returns the upgraded copy and Caffe's log lines; a solver that needs nothing comes back
    equal, with no lines. Setting both `solver_type` and `type` raises UserError, even when
    they agree, as Caffe's check does.
    """
    upgraded = _copy(solver)
    if not solver_needs_upgrade(upgraded):
        return upgraded, []
    lines = [f"Attempting to upgrade input file specified using deprecated 'solver_type' field (enum)': {source}"]
    enum_name = SolverParameter.SolverType.Name(upgraded.solver_type)
    if upgraded.HasField("type"):
        raise UserError(f"{source}: both the deprecated 'solver_type: {enum_name}' and 'type: "
                        f"\"{upgraded.type}\"' are set; keep only 'type: \"{SOLVER_TYPE_NAMES[enum_name]}\"'")
    upgraded.type = SOLVER_TYPE_NAMES[enum_name]
    upgraded.ClearField("solver_type")
    lines.append("Successfully upgraded file specified using deprecated 'solver_type' field (enum) to "
                 "'type' field (string).")
    lines.append("Note that future Caffe releases will only support 'type' field (string) for a solver's type.")
    return upgraded, lines
