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

No function changes its argument: each returns an upgraded copy. Where Caffe logs an error and
carries on (a V0 field that means nothing for its layer type, say), the message is returned among
the log lines and the upgrade goes on; where Caffe aborts (``LOG(FATAL)``, a failed ``CHECK``),
``UserError`` is raised, naming the file and the layer.
"""
from __future__ import annotations

from google.protobuf.message import Message

from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2

NetParameter = caffe_pb2.NetParameter
SolverParameter = caffe_pb2.SolverParameter
V1LayerParameter = caffe_pb2.V1LayerParameter


def _copy(message: Message) -> Message:
    duplicate = type(message)()
    duplicate.CopyFrom(message)
    return duplicate


def _assign(target: Message, field: str, value) -> None:
    """Set, append to or copy into `target.field`, whichever its kind asks for."""
    descriptor = target.DESCRIPTOR.fields_by_name[field]
    if descriptor.is_repeated:
        getattr(target, field).append(value)
    elif descriptor.message_type is not None:
        getattr(target, field).CopyFrom(value)
    else:
        setattr(target, field, value)


# ----------------------------------------------------------------------------------------------
# V0 -> V1: `layers { layer { name type ... } bottom top }` becomes `layers { name type: ENUM ... }`

_V0_TYPE_TO_V1 = {
    "accuracy": "ACCURACY",
    "bnll": "BNLL",
    "concat": "CONCAT",
    "conv": "CONVOLUTION",
    "data": "DATA",
    "dropout": "DROPOUT",
    "euclidean_loss": "EUCLIDEAN_LOSS",
    "flatten": "FLATTEN",
    "hdf5_data": "HDF5_DATA",
    "hdf5_output": "HDF5_OUTPUT",
    "im2col": "IM2COL",
    "images": "IMAGE_DATA",
    "infogain_loss": "INFOGAIN_LOSS",
    "innerproduct": "INNER_PRODUCT",
    "lrn": "LRN",
    "multinomial_logistic_loss": "MULTINOMIAL_LOGISTIC_LOSS",
    "pool": "POOLING",
    "relu": "RELU",
    "sigmoid": "SIGMOID",
    "softmax": "SOFTMAX",
    "softmax_loss": "SOFTMAX_LOSS",
    "split": "SPLIT",
    "tanh": "TANH",
    "window_data": "WINDOW_DATA",
}

_CONV_OR_IP = ("conv", "innerproduct")
_DATA_SOURCES = ("data", "hdf5_data", "images", "window_data")

# V0 field -> {V0 layer type accepting it: (V1 *_param field, field inside it)}. A field set on a
# layer of any other type is dropped with an error, as Caffe does; None copies the whole message.
_V0_TYPED_FIELDS: dict[str, dict[str, tuple[str, str | None]]] = {
    "num_output": {"conv": ("convolution_param", "num_output"),
                   "innerproduct": ("inner_product_param", "num_output")},
    "biasterm": {"conv": ("convolution_param", "bias_term"),
                 "innerproduct": ("inner_product_param", "bias_term")},
    "weight_filler": {"conv": ("convolution_param", "weight_filler"),
                      "innerproduct": ("inner_product_param", "weight_filler")},
    "bias_filler": {"conv": ("convolution_param", "bias_filler"),
                    "innerproduct": ("inner_product_param", "bias_filler")},
    "pad": {"conv": ("convolution_param", "pad"), "pool": ("pooling_param", "pad")},
    "kernelsize": {"conv": ("convolution_param", "kernel_size"), "pool": ("pooling_param", "kernel_size")},
    "group": {"conv": ("convolution_param", "group")},
    "stride": {"conv": ("convolution_param", "stride"), "pool": ("pooling_param", "stride")},
    "pool": {"pool": ("pooling_param", "pool")},
    "dropout_ratio": {"dropout": ("dropout_param", "dropout_ratio")},
    "local_size": {"lrn": ("lrn_param", "local_size")},
    "alpha": {"lrn": ("lrn_param", "alpha")},
    "beta": {"lrn": ("lrn_param", "beta")},
    "k": {"lrn": ("lrn_param", "k")},
    "source": {"data": ("data_param", "source"),
               "hdf5_data": ("hdf5_data_param", "source"),
               "images": ("image_data_param", "source"),
               "window_data": ("window_data_param", "source"),
               "infogain_loss": ("infogain_loss_param", "source")},
    "batchsize": {"data": ("data_param", "batch_size"),
                  "hdf5_data": ("hdf5_data_param", "batch_size"),
                  "images": ("image_data_param", "batch_size"),
                  "window_data": ("window_data_param", "batch_size")},
    "rand_skip": {"data": ("data_param", "rand_skip"), "images": ("image_data_param", "rand_skip")},
    "shuffle_images": {"images": ("image_data_param", "shuffle")},
    "new_height": {"images": ("image_data_param", "new_height")},
    "new_width": {"images": ("image_data_param", "new_width")},
    "concat_dim": {"concat": ("concat_param", "concat_dim")},
    "det_fg_threshold": {"window_data": ("window_data_param", "fg_threshold")},
    "det_bg_threshold": {"window_data": ("window_data_param", "bg_threshold")},
    "det_fg_fraction": {"window_data": ("window_data_param", "fg_fraction")},
    "det_context_pad": {"window_data": ("window_data_param", "context_pad")},
    "det_crop_mode": {"window_data": ("window_data_param", "crop_mode")},
    "hdf5_output_param": {"hdf5_output": ("hdf5_output_param", None)},
}

# V0 fields that move to transform_param whatever the layer type.
_V0_TRANSFORM_FIELDS = {"scale": "scale", "meanfile": "mean_file", "cropsize": "crop_size", "mirror": "mirror"}


def net_needs_v0_to_v1_upgrade(net: NetParameter) -> bool:
    """True if any entry of `layers` holds a V0 `layer` message (Caffe's NetNeedsV0ToV1Upgrade)."""
    return any(entry.HasField("layer") for entry in net.layers)


def v0_layer_type_to_v1(v0_type: str, source: str = "<net>", layer_name: str = "") -> int:
    """The V1LayerParameter.LayerType value for a V0 type string such as "conv" or "innerproduct".

    An unknown type raises UserError, where Caffe's UpgradeV0LayerType aborts.
    """
    enum_name = _V0_TYPE_TO_V1.get(v0_type)
    if enum_name is None:
        raise UserError(f"{source}: layer '{layer_name}' has V0 type '{v0_type}', which no version of "
                        f"Caffe's V0 format defines; known V0 types: {', '.join(sorted(_V0_TYPE_TO_V1))}")
    return V1LayerParameter.LayerType.Value(enum_name)


def merge_v0_padding_layers(net: NetParameter, source: str = "<net>") -> NetParameter:
    """Fold each V0 "padding" layer into the conv or pool layer that reads its output.

    The padding layer disappears; its `pad` goes to the consumer, which reads the padding layer's
    input instead. Mirrors Caffe's UpgradeV0PaddingLayers, including its fatal checks (a bottom
    no earlier layer produced; padding feeding anything but a single-input conv or pool layer),
    which raise UserError here.
    """
    merged = _copy(net)
    merged.ClearField("layers")
    # Blob name -> index (in `net.layers`) of the layer that last wrote it; -1 for net inputs.
    last_writer: dict[str, int] = {name: -1 for name in net.input}
    for index, entry in enumerate(net.layers):
        v0 = entry.layer
        if v0.type != "padding":
            merged.layers.add().CopyFrom(entry)
        for bottom_index, blob in enumerate(entry.bottom):
            if blob not in last_writer:
                raise UserError(f"{source}: layer '{v0.name}' (V0 layer #{index}) reads blob '{blob}', "
                                "which no earlier layer or net input produces")
            writer_index = last_writer[blob]
            if writer_index == -1:
                continue
            writer = net.layers[writer_index]
            if writer.layer.type != "padding":
                continue
            if v0.type not in ("conv", "pool"):
                raise UserError(f"{source}: padding layer '{writer.layer.name}' feeds layer '{v0.name}' "
                                f"of type '{v0.type}'; V0 padding layers may only feed conv or pool layers")
            if len(entry.bottom) != 1:
                raise UserError(f"{source}: layer '{v0.name}' reads padding layer '{writer.layer.name}' "
                                "but has more than one bottom; a padded conv/pool layer takes one input")
            if len(writer.bottom) != 1 or len(writer.top) != 1:
                raise UserError(f"{source}: padding layer '{writer.layer.name}' must have exactly one "
                                "bottom and one top")
            consumer = merged.layers[len(merged.layers) - 1]
            consumer.layer.pad = writer.layer.pad
            consumer.bottom[bottom_index] = writer.bottom[0]
        for blob in entry.top:
            last_writer[blob] = index
    return merged


def upgrade_v0_layer(entry: V1LayerParameter, source: str = "<net>") -> tuple[V1LayerParameter, list[str]]:
    """Turn one V0 `layers { layer {...} bottom top }` entry into a V1 layer.

    Returns the V1 layer and a list of problems: V0 fields that mean nothing for the layer's
    type, which Caffe's UpgradeV0LayerParameter reports and drops. Only bottom, top and the V0
    `layer` message are read; any V1 field already on the entry is lost, as in Caffe.
    """
    upgraded = V1LayerParameter()
    upgraded.bottom.extend(entry.bottom)
    upgraded.top.extend(entry.top)
    problems: list[str] = []
    if not entry.HasField("layer"):
        return upgraded, problems
    v0 = entry.layer
    if v0.HasField("name"):
        upgraded.name = v0.name
    if v0.HasField("type"):
        upgraded.type = v0_layer_type_to_v1(v0.type, source, v0.name)
    for blob in v0.blobs:
        upgraded.blobs.add().CopyFrom(blob)
    upgraded.blobs_lr.extend(v0.blobs_lr)
    upgraded.weight_decay.extend(v0.weight_decay)
    for v0_field, targets in _V0_TYPED_FIELDS.items():
        if not v0.HasField(v0_field):
            continue
        target = targets.get(v0.type)
        if target is None:
            problems.append(f"Unknown parameter {v0_field} for layer type {v0.type} "
                            f"(layer '{v0.name}'); dropped")
            continue
        param_name, field = target
        value = getattr(v0, v0_field)
        param = getattr(upgraded, param_name)
        if field is None:
            param.CopyFrom(value)
        elif v0_field == "pool":
            method = caffe_pb2.V0LayerParameter.PoolMethod.Name(value)
            param.pool = caffe_pb2.PoolingParameter.PoolMethod.Value(method)
        else:
            _assign(param, field, value)
    for v0_field, field in _V0_TRANSFORM_FIELDS.items():
        if v0.HasField(v0_field):
            setattr(upgraded.transform_param, field, getattr(v0, v0_field))
    return upgraded, problems


def upgrade_v0_net(net: NetParameter, source: str = "<net>") -> tuple[NetParameter, list[str]]:
    """Upgrade a V0 net to V1 layers; returns the net and the problems met (Caffe's UpgradeV0Net).

    Like Caffe, only the name, layers, input, input_dim and force_backward survive.
    """
    padded = merge_v0_padding_layers(net, source)
    upgraded = NetParameter()
    if padded.HasField("name"):
        upgraded.name = padded.name
    problems: list[str] = []
    for entry in padded.layers:
        layer, layer_problems = upgrade_v0_layer(entry, source)
        upgraded.layers.add().CopyFrom(layer)
        problems.extend(layer_problems)
    upgraded.input.extend(padded.input)
    upgraded.input_dim.extend(padded.input_dim)
    if padded.HasField("force_backward"):
        upgraded.force_backward = padded.force_backward
    return upgraded, problems


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
