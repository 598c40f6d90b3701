"""Model-zoo architectures as Caffe NetParameter prototxt text, built from their published descriptions.

    from tests.zoo.nets import NAMES, zoo_net
    text = zoo_net("resnet50", batch=2, size=64, train=True, dropout=False)

Each generator follows its paper's layer table (and, where the authors released one, the layout
of their Caffe model: names, where the stride sits, which convolutions drop their bias): layer
counts, channel widths, kernel sizes, strides and pads as published, with the weight fillers the
architecture was trained from. Only the input is free: `size` (square, in pixels) and `batch` set
the Input layer, so one architecture runs small in tests and at 224 (227 for the AlexNet family)
in full. Classifier heads pool globally where the paper pools over the whole last feature map
(7x7 at 224), which is the same layer at full size and keeps small inputs valid.

TEST nets (`train=False`) are deploy nets: Input "data", the body, Softmax "prob". TRAIN nets add
an Input "label" and end in SoftmaxWithLoss "loss" (GoogLeNet also keeps its two auxiliary
classifiers, "loss1/loss" and "loss2/loss" with loss weight 0.3, as in its training net). `dropout=False` leaves the Dropout layers
out, so a TRAIN pass is deterministic. BatchNorm layers set no use_global_stats: the phase picks
batch statistics (TRAIN) or the stored ones (TEST), as Caffe's default does.
"""
from __future__ import annotations

from collections.abc import Callable

# weight and bias fillers, as prototxt fragments
XAVIER = 'type: "xavier"'
MSRA = 'type: "msra"'


def gaussian(std: float) -> str:
    return f'type: "gaussian" std: {std}'


def constant(value: float) -> str:
    return f'type: "constant" value: {value}'


class NetBuilder:
    """Appends layers to a prototxt; each helper returns the name of the blob it produced.

    `weight`/`bias` are the architecture's default fillers; `dropout` and `train` are the
    variant's switches (see zoo_net).
    """

    def __init__(self, name: str, batch: int, size: int, *, train: bool, dropout: bool, num_classes: int,
                 weight: str, bias: str = constant(0)):
        self.train = train
        self.dropout = dropout
        self.num_classes = num_classes
        self.weight = weight
        self.bias = bias
        self.lines = [f'name: "{name}"']
        shapes = f"shape {{ dim: {batch} dim: 3 dim: {size} dim: {size} }}"
        if train:
            self.layer("input", "Input", [], ["data", "label"],
                       f"input_param {{ {shapes} shape {{ dim: {batch} }} }}")
        else:
            self.layer("input", "Input", [], ["data"], f"input_param {{ {shapes} }}")

    def layer(self, name: str, type: str, bottoms: list[str], tops: list[str], body: str = "") -> str:
        parts = [f'name: "{name}" type: "{type}"', *[f'bottom: "{b}"' for b in bottoms],
                 *[f'top: "{t}"' for t in tops], body]
        self.lines.append("layer { " + " ".join(p for p in parts if p) + " }")
        return tops[0] if tops else ""

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"

    # --- vision ---
    def conv(self, name: str, bottom: str, num_output: int, kernel: int, stride: int = 1, pad: int = 0,
             group: int = 1, bias: bool = True, weight: str | None = None, bias_filler: str | None = None) -> str:
        p = f"num_output: {num_output} kernel_size: {kernel}"
        p += f" stride: {stride}" * (stride != 1) + f" pad: {pad}" * (pad != 0) + f" group: {group}" * (group != 1)
        p += f" weight_filler {{ {weight or self.weight} }}"
        p += f" bias_filler {{ {bias_filler or self.bias} }}" if bias else " bias_term: false"
        return self.layer(name, "Convolution", [bottom], [name], f"convolution_param {{ {p} }}")

    def fc(self, name: str, bottom: str, num_output: int, weight: str | None = None,
           bias_filler: str | None = None) -> str:
        p = (f"num_output: {num_output} weight_filler {{ {weight or self.weight} }} "
             f"bias_filler {{ {bias_filler or self.bias} }}")
        return self.layer(name, "InnerProduct", [bottom], [name], f"inner_product_param {{ {p} }}")

    def pool(self, name: str, bottom: str, method: str, kernel: int = 0, stride: int = 1, pad: int = 0) -> str:
        """MAX or AVE pooling; kernel 0 pools globally."""
        if kernel == 0:
            p = f"pool: {method} global_pooling: true"
        else:
            p = f"pool: {method} kernel_size: {kernel}" + f" stride: {stride}" * (stride != 1) + f" pad: {pad}" * (pad != 0)
        return self.layer(name, "Pooling", [bottom], [name], f"pooling_param {{ {p} }}")

    def lrn(self, name: str, bottom: str, local_size: int = 5, alpha: float = 1e-4, beta: float = 0.75) -> str:
        return self.layer(name, "LRN", [bottom], [name],
                          f"lrn_param {{ local_size: {local_size} alpha: {alpha} beta: {beta} }}")

    # --- in place ---
    def relu(self, name: str, blob: str) -> str:
        return self.layer(name, "ReLU", [blob], [blob])

    def relu6(self, name: str, bottom: str) -> str:
        """MobileNet v2's ReLU6, as Caffe's Clip layer (min 0, max 6), into a new blob `name`.

        Not in place: Caffe's Clip backward tests its bottom data, which in place is already
        clipped, so in place it passes the gradient through every element."""
        return self.layer(name, "Clip", [bottom], [name], "clip_param { min: 0 max: 6 }")

    def batchnorm(self, bn: str, scale: str, bottom: str, top: str | None = None) -> str:
        """Caffe's BatchNorm (statistics only) + Scale (learned gamma, beta); in place unless `top`.

        The Scale layer keeps Caffe's default fillers (gamma 1, beta 0): tests randomize them."""
        top = top or bottom
        self.layer(bn, "BatchNorm", [bottom], [top])
        return self.layer(scale, "Scale", [top], [top], "scale_param { bias_term: true }")

    def dropout_(self, name: str, blob: str, ratio: float) -> str:
        if self.dropout:
            self.layer(name, "Dropout", [blob], [blob], f"dropout_param {{ dropout_ratio: {ratio} }}")
        return blob

    # --- structure ---
    def concat(self, name: str, bottoms: list[str]) -> str:
        return self.layer(name, "Concat", bottoms, [name])

    def add(self, name: str, bottoms: list[str]) -> str:
        return self.layer(name, "Eltwise", bottoms, [name], "eltwise_param { operation: SUM }")

    # --- heads ---
    def classifier(self, scores: str, loss: str = "loss", prob: str = "prob", loss_weight: float = 1.0) -> None:
        """SoftmaxWithLoss against "label" in TRAIN, Softmax probabilities in TEST."""
        if self.train:
            weight = f"loss_weight: {loss_weight}" if loss_weight != 1.0 else ""
            self.layer(loss, "SoftmaxWithLoss", [scores, "label"], [loss], weight)
        else:
            self.layer(prob, "Softmax", [scores], [prob])


# --- AlexNet family (Krizhevsky et al. 2012; CaffeNet is BVLC's variant with pool before norm) ---
def _alexnet(n: NetBuilder, pool_before_norm: bool) -> None:
    def block(i: int, x: str) -> str:
        if pool_before_norm:
            return n.lrn(f"norm{i}", n.pool(f"pool{i}", x, "MAX", 3, 2))
        return n.pool(f"pool{i}", n.lrn(f"norm{i}", x), "MAX", 3, 2)

    # BVLC's fillers: biases 0.1 where the paper uses 1 (conv2, conv4, conv5, fc6, fc7)
    x = n.relu("relu1", n.conv("conv1", "data", 96, 11, stride=4, bias_filler=constant(0)))
    x = block(1, x)
    # the two-GPU split of the original survives as group: 2 in conv2, conv4 and conv5
    x = block(2, n.relu("relu2", n.conv("conv2", x, 256, 5, pad=2, group=2, bias_filler=constant(0.1))))
    x = n.relu("relu3", n.conv("conv3", x, 384, 3, pad=1, bias_filler=constant(0)))
    x = n.relu("relu4", n.conv("conv4", x, 384, 3, pad=1, group=2, bias_filler=constant(0.1)))
    x = n.relu("relu5", n.conv("conv5", x, 256, 3, pad=1, group=2, bias_filler=constant(0.1)))
    x = n.pool("pool5", x, "MAX", 3, 2)
    for i in (6, 7):
        x = n.relu(f"relu{i}", n.fc(f"fc{i}", x, 4096, weight=gaussian(0.005), bias_filler=constant(0.1)))
        x = n.dropout_(f"drop{i}", x, 0.5)
    n.classifier(n.fc("fc8", x, n.num_classes, bias_filler=constant(0)))


def alexnet(n: NetBuilder) -> None:
    _alexnet(n, pool_before_norm=False)


def caffenet(n: NetBuilder) -> None:
    _alexnet(n, pool_before_norm=True)


# --- VGG-16, configuration D (Simonyan & Zisserman 2014) ---
def vgg16(n: NetBuilder) -> None:
    # xavier: the paper notes that Glorot's initialization trains it without pre-training
    x = "data"
    for stage, (width, convs) in enumerate([(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)], start=1):
        for j in range(1, convs + 1):
            x = n.relu(f"relu{stage}_{j}", n.conv(f"conv{stage}_{j}", x, width, 3, pad=1))
        x = n.pool(f"pool{stage}", x, "MAX", 2, 2)
    for i in (6, 7):
        x = n.dropout_(f"drop{i}", n.relu(f"relu{i}", n.fc(f"fc{i}", x, 4096)), 0.5)
    n.classifier(n.fc("fc8", x, n.num_classes))


# --- Network in Network, ImageNet model (Lin et al. 2013) ---
def nin(n: NetBuilder) -> None:
    x = "data"
    stages = [(96, 11, 4, 0), (256, 5, 1, 2), (384, 3, 1, 1)]
    for i, (width, kernel, stride, pad) in enumerate(stages, start=1):
        x = n.relu(f"relu{i}", n.conv(f"conv{i}", x, width, kernel, stride=stride, pad=pad))
        for j in (2 * i - 1, 2 * i):  # the two 1x1 "cccp" layers of each mlpconv block
            x = n.relu(f"relu_cccp{j}", n.conv(f"cccp{j}", x, width, 1, weight=gaussian(0.05)))
        x = n.pool(f"pool{i}", x, "MAX", 3, 2)
    x = n.dropout_("drop", x, 0.5)
    x = n.relu("relu4", n.conv("conv4-1024", x, 1024, 3, pad=1))
    x = n.relu("relu_cccp7", n.conv("cccp7-1024", x, 1024, 1, weight=gaussian(0.05)))
    x = n.relu("relu_cccp8", n.conv("cccp8", x, n.num_classes, 1, weight=gaussian(0.01)))
    n.classifier(n.pool("pool4", x, "AVE"))


# --- GoogLeNet (Szegedy et al. 2014, Table 1) ---
# (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj)
GOOGLENET = {
    "3a": (64, 96, 128, 16, 32, 32), "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64), "4b": (160, 112, 224, 24, 64, 64), "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64), "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128), "5b": (384, 192, 384, 48, 128, 128),
}


def _inception_v1(n: NetBuilder, name: str, x: str) -> str:
    c1, r3, c3, r5, c5, pp = GOOGLENET[name]
    p = f"inception_{name}"

    def conv_relu(suffix: str, bottom: str, width: int, kernel: int, pad: int = 0) -> str:
        return n.relu(f"{p}/relu_{suffix}", n.conv(f"{p}/{suffix}", bottom, width, kernel, pad=pad))

    branches = [
        conv_relu("1x1", x, c1, 1),
        conv_relu("3x3", conv_relu("3x3_reduce", x, r3, 1), c3, 3, pad=1),
        conv_relu("5x5", conv_relu("5x5_reduce", x, r5, 1), c5, 5, pad=2),
        conv_relu("pool_proj", n.pool(f"{p}/pool", x, "MAX", 3, 1, pad=1), pp, 1),
    ]
    return n.concat(f"{p}/output", branches)


def googlenet(n: NetBuilder) -> None:
    x = n.relu("conv1/relu_7x7", n.conv("conv1/7x7_s2", "data", 64, 7, stride=2, pad=3))
    x = n.lrn("pool1/norm1", n.pool("pool1/3x3_s2", x, "MAX", 3, 2))
    x = n.relu("conv2/relu_3x3_reduce", n.conv("conv2/3x3_reduce", x, 64, 1))
    x = n.relu("conv2/relu_3x3", n.conv("conv2/3x3", x, 192, 3, pad=1))
    x = n.pool("pool2/3x3_s2", n.lrn("conv2/norm2", x), "MAX", 3, 2)
    for name in ("3a", "3b"):
        x = _inception_v1(n, name, x)
    x = n.pool("pool3/3x3_s2", x, "MAX", 3, 2)
    for name in ("4a", "4b", "4c", "4d", "4e"):
        x = _inception_v1(n, name, x)
        if n.train and name in ("4a", "4d"):
            _googlenet_aux(n, "loss1" if name == "4a" else "loss2", x)
    x = n.pool("pool4/3x3_s2", x, "MAX", 3, 2)
    for name in ("5a", "5b"):
        x = _inception_v1(n, name, x)
    x = n.dropout_("pool5/drop_7x7_s1", n.pool("pool5/7x7_s1", x, "AVE"), 0.4)
    n.classifier(n.fc("loss3/classifier", x, n.num_classes, bias_filler=constant(0)))


def _googlenet_aux(n: NetBuilder, p: str, x: str) -> None:
    """An auxiliary classifier: 5x5/3 average pool, 1x1 conv 128, fc 1024, dropout 70%, weight 0.3."""
    x = n.pool(f"{p}/ave_pool", x, "AVE", 5, 3)
    x = n.relu(f"{p}/relu_conv", n.conv(f"{p}/conv", x, 128, 1))
    x = n.dropout_(f"{p}/drop_fc", n.relu(f"{p}/relu_fc", n.fc(f"{p}/fc", x, 1024)), 0.7)
    n.classifier(n.fc(f"{p}/classifier", x, n.num_classes, bias_filler=constant(0)), loss=f"{p}/loss",
                 loss_weight=0.3)


# --- Inception with Batch Normalization (Ioffe & Szegedy 2015, Figure 5) ---
# (1x1, 3x3 reduce, 3x3, double 3x3 reduce, double 3x3, pool, pool proj); stride-2 modules have
# no 1x1 branch and pass the max pool through
INCEPTION_BN = {
    "3a": (64, 64, 64, 64, 96, "AVE", 32), "3b": (64, 64, 96, 64, 96, "AVE", 64),
    "3c": (0, 128, 160, 64, 96, "MAX", 0),
    "4a": (224, 64, 96, 96, 128, "AVE", 128), "4b": (192, 96, 128, 96, 128, "AVE", 128),
    "4c": (160, 128, 160, 128, 160, "AVE", 128), "4d": (96, 128, 192, 160, 192, "AVE", 128),
    "4e": (0, 128, 192, 192, 256, "MAX", 0),
    "5a": (352, 192, 320, 160, 224, "AVE", 128), "5b": (352, 192, 320, 192, 224, "MAX", 128),
}


def _conv_bn_relu(n: NetBuilder, name: str, x: str, width: int, kernel: int, stride: int = 1, pad: int = 0) -> str:
    x = n.conv(name, x, width, kernel, stride=stride, pad=pad, bias=False)
    return n.relu(f"{name}/relu", n.batchnorm(f"{name}/bn", f"{name}/scale", x))


def _inception_bn(n: NetBuilder, name: str, x: str) -> str:
    c1, r3, c3, rd, cd, pool, pp = INCEPTION_BN[name]
    p = f"inception_{name}"
    s = 2 if pp == 0 else 1  # 3c and 4e: no pool projection, every branch strides by 2
    branches = [_conv_bn_relu(n, f"{p}/1x1", x, c1, 1)] if c1 else []
    branches.append(_conv_bn_relu(n, f"{p}/3x3", _conv_bn_relu(n, f"{p}/3x3_reduce", x, r3, 1), c3, 3, s, 1))
    d = _conv_bn_relu(n, f"{p}/double_3x3_reduce", x, rd, 1)
    d = _conv_bn_relu(n, f"{p}/double_3x3_1", d, cd, 3, pad=1)
    branches.append(_conv_bn_relu(n, f"{p}/double_3x3_2", d, cd, 3, s, 1))
    if pp:
        branches.append(_conv_bn_relu(n, f"{p}/pool_proj", n.pool(f"{p}/pool", x, pool, 3, 1, pad=1), pp, 1))
    else:
        branches.append(n.pool(f"{p}/pool", x, pool, 3, 2))
    return n.concat(f"{p}/output", branches)


def inception_bn(n: NetBuilder) -> None:
    # the paper's first layer is a separable 7x7 (depth multiplier 8); like most Caffe ports, a
    # plain convolution here
    x = _conv_bn_relu(n, "conv1/7x7_s2", "data", 64, 7, 2, 3)
    x = n.pool("pool1/3x3_s2", x, "MAX", 3, 2)
    x = _conv_bn_relu(n, "conv2/3x3_reduce", x, 64, 1)
    x = _conv_bn_relu(n, "conv2/3x3", x, 192, 3, pad=1)
    x = n.pool("pool2/3x3_s2", x, "MAX", 3, 2)
    for name in INCEPTION_BN:
        x = _inception_bn(n, name, x)
    n.classifier(n.fc("fc", n.pool("pool5/global", x, "AVE"), n.num_classes))


# --- ResNet (He et al. 2015), the authors' Caffe layout: BatchNorm + Scale after every
# convolution, stride 2 in the first 1x1 of a downsampling bottleneck, projection shortcuts only
# where the shape changes ---
def _bottleneck(n: NetBuilder, name: str, x: str, width: int, stride: int, project: bool) -> str:
    def conv_bn(branch: str, bottom: str, out: int, kernel: int, s: int = 1, pad: int = 0) -> str:
        y = n.conv(f"res{name}_{branch}", bottom, out, kernel, stride=s, pad=pad, bias=False)
        return n.batchnorm(f"bn{name}_{branch}", f"scale{name}_{branch}", y)

    shortcut = conv_bn("branch1", x, 4 * width, 1, stride) if project else x
    y = n.relu(f"res{name}_branch2a_relu", conv_bn("branch2a", x, width, 1, stride))
    y = n.relu(f"res{name}_branch2b_relu", conv_bn("branch2b", y, width, 3, pad=1))
    y = conv_bn("branch2c", y, 4 * width, 1)
    return n.relu(f"res{name}_relu", n.add(f"res{name}", [shortcut, y]))


def _resnet(n: NetBuilder, blocks: tuple[int, int, int, int]) -> None:
    x = n.conv("conv1", "data", 64, 7, stride=2, pad=3, bias=False)
    x = n.relu("conv1_relu", n.batchnorm("bn_conv1", "scale_conv1", x))
    x = n.pool("pool1", x, "MAX", 3, 2)
    for stage, (count, width) in enumerate(zip(blocks, (64, 128, 256, 512)), start=2):
        for b in range(count):
            # the authors name blocks a, b, c, ... and, in stages of more than six, a, b1, b2, ...
            name = f"{stage}{'abcdef'[b]}" if count <= 6 else f"{stage}{'a' if b == 0 else f'b{b}'}"
            x = _bottleneck(n, name, x, width, 2 if b == 0 and stage > 2 else 1, project=b == 0)
    n.classifier(n.fc("fc1000", n.pool("pool5", x, "AVE"), n.num_classes))


def resnet50(n: NetBuilder) -> None:
    _resnet(n, (3, 4, 6, 3))


def resnet101(n: NetBuilder) -> None:
    _resnet(n, (3, 4, 23, 3))


def resnet152(n: NetBuilder) -> None:
    _resnet(n, (3, 8, 36, 3))


# --- pre-activation ResNet-18 (He et al. 2016, "Identity Mappings"): BN-ReLU-conv units, basic
# blocks of two 3x3 convolutions, a 1x1 projection of the pre-activated input where the shape
# changes, and a final BN-ReLU before the pooling ---
def _preact_basic(n: NetBuilder, name: str, x: str, width: int, stride: int, project: bool) -> str:
    # the pre-activation gets its own blob: the identity shortcut needs the block's raw input
    a = n.relu(f"{name}_relu1", n.batchnorm(f"{name}_bn1", f"{name}_scale1", x, top=f"{name}_preact"))
    shortcut = n.conv(f"{name}_proj", a, width, 1, stride=stride, bias=False) if project else x
    y = n.conv(f"{name}_conv1", a, width, 3, stride=stride, pad=1, bias=False)
    y = n.relu(f"{name}_relu2", n.batchnorm(f"{name}_bn2", f"{name}_scale2", y))
    y = n.conv(f"{name}_conv2", y, width, 3, pad=1, bias=False)
    return n.add(name, [shortcut, y])


def preact_resnet18(n: NetBuilder) -> None:
    x = n.conv("conv1", "data", 64, 7, stride=2, pad=3, bias=False)
    x = n.relu("conv1_relu", n.batchnorm("bn_conv1", "scale_conv1", x))
    x = n.pool("pool1", x, "MAX", 3, 2)
    for stage, width in enumerate((64, 128, 256, 512), start=2):
        for b in "ab":
            first = b == "a" and stage > 2
            x = _preact_basic(n, f"res{stage}{b}", x, width, 2 if first else 1, project=first)
    x = n.relu("post_relu", n.batchnorm("post_bn", "post_scale", x, top="post"))
    n.classifier(n.fc("fc1000", n.pool("pool5", x, "AVE"), n.num_classes))


# --- DenseNet-121 (Huang et al. 2017): growth rate 32, bottleneck 1x1 to 4*32, compression 0.5 ---
def densenet121(n: NetBuilder, growth: int = 32, blocks: tuple[int, ...] = (6, 12, 24, 16)) -> None:
    def bn_relu_conv(name: str, x: str, width: int, kernel: int, pad: int = 0) -> str:
        # BN gets a new blob: x is the running concatenation, read again by the next Concat
        a = n.relu(f"{name}/relu", n.batchnorm(f"{name}/bn", f"{name}/scale", x, top=f"{name}/bn"))
        return n.conv(name, a, width, kernel, pad=pad, bias=False)

    x = n.conv("conv1", "data", 64, 7, stride=2, pad=3, bias=False)
    x = n.relu("conv1/relu", n.batchnorm("conv1/bn", "conv1/scale", x))
    # Caffe rounds pooled sizes up: no pad gives the paper's 56x56 at 224
    x = n.pool("pool1", x, "MAX", 3, 2)
    channels = 64
    for b, layers in enumerate(blocks, start=1):
        for i in range(1, layers + 1):
            p = f"conv{b + 1}_{i}"
            y = bn_relu_conv(f"{p}/x1", x, 4 * growth, 1)
            y = bn_relu_conv(f"{p}/x2", y, growth, 3, pad=1)
            x = n.concat(f"concat_{b + 1}_{i}", [x, y])
            channels += growth
        if b < len(blocks):
            channels //= 2
            x = n.pool(f"pool{b + 1}", bn_relu_conv(f"conv{b + 1}_blk", x, channels, 1), "AVE", 2, 2)
    x = n.relu("conv5_blk/relu", n.batchnorm("conv5_blk/bn", "conv5_blk/scale", x, top="conv5_blk/bn"))
    n.classifier(n.fc("fc6", n.pool("pool5", x, "AVE"), n.num_classes))


# --- MobileNet v1 (Howard et al. 2017, Table 1), width multiplier 1 ---
MOBILENET_V1 = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), *[(512, 1)] * 5, (1024, 2), (1024, 1)]


def mobilenet_v1(n: NetBuilder) -> None:
    def conv_bn_relu(name: str, x: str, width: int, kernel: int, stride: int = 1, group: int = 1) -> str:
        x = n.conv(name, x, width, kernel, stride=stride, pad=kernel // 2, group=group, bias=False)
        return n.relu(f"relu{name[4:]}", n.batchnorm(f"{name}/bn", f"{name}/scale", x))

    x = conv_bn_relu("conv1", "data", 32, 3, 2)
    channels = 32
    for i, (width, stride) in enumerate(MOBILENET_V1, start=2):
        # depthwise 3x3: a grouped convolution with one group per channel, then pointwise 1x1
        x = conv_bn_relu(f"conv{i}_1/dw", x, channels, 3, stride, group=channels)
        x = conv_bn_relu(f"conv{i}_2/sep", x, width, 1)
        channels = width
    n.classifier(n.fc("fc7", n.pool("pool6", x, "AVE"), n.num_classes))


# --- MobileNet v2 (Sandler et al. 2018, Table 2): (expansion t, channels c, repeats n, stride s) ---
MOBILENET_V2 = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]


def mobilenet_v2(n: NetBuilder) -> None:
    def conv_bn(name: str, x: str, width: int, kernel: int, stride: int = 1, group: int = 1,
                relu6: bool = True) -> str:
        x = n.conv(name, x, width, kernel, stride=stride, pad=kernel // 2, group=group, bias=False)
        x = n.batchnorm(f"{name}/bn", f"{name}/scale", x)
        return n.relu6(f"{name}/relu", x) if relu6 else x

    x = conv_bn("conv1", "data", 32, 3, 2)
    channels = 32
    block = 0
    for t, c, repeats, s in MOBILENET_V2:
        for r in range(repeats):
            block += 1
            p = f"block{block}"
            stride = s if r == 0 else 1
            y = conv_bn(f"{p}/expand", x, t * channels, 1) if t != 1 else x
            y = conv_bn(f"{p}/dwise", y, t * channels, 3, stride, group=t * channels)
            y = conv_bn(f"{p}/linear", y, c, 1, relu6=False)  # linear bottleneck: no activation
            x = n.add(f"{p}/add", [x, y]) if stride == 1 and channels == c else y
            channels = c
    x = conv_bn("conv_last", x, 1280, 1)
    n.classifier(n.fc("fc", n.pool("pool", x, "AVE"), n.num_classes))


# --- SqueezeNet (Iandola et al. 2016): fire modules (squeeze 1x1, expand 1x1 and 3x3) ---
def _fire(n: NetBuilder, i: int, x: str, squeeze: int, expand: int) -> str:
    p = f"fire{i}"
    s = n.relu(f"{p}/relu_squeeze1x1", n.conv(f"{p}/squeeze1x1", x, squeeze, 1))
    e1 = n.relu(f"{p}/relu_expand1x1", n.conv(f"{p}/expand1x1", s, expand, 1))
    e3 = n.relu(f"{p}/relu_expand3x3", n.conv(f"{p}/expand3x3", s, expand, 3, pad=1))
    return n.concat(f"{p}/concat", [e1, e3])


def _squeezenet(n: NetBuilder, version: str) -> None:
    fires = {2: (16, 64), 3: (16, 64), 4: (32, 128), 5: (32, 128), 6: (48, 192), 7: (48, 192), 8: (64, 256),
             9: (64, 256)}
    if version == "1.0":
        x = n.relu("relu_conv1", n.conv("conv1", "data", 96, 7, stride=2))
        pools_after = (1, 4, 8)
    else:  # 1.1: a 3x3 first convolution with 64 filters, and the pools moved earlier
        x = n.relu("relu_conv1", n.conv("conv1", "data", 64, 3, stride=2))
        pools_after = (1, 3, 5)
    x = n.pool("pool1", x, "MAX", 3, 2)
    for i, (squeeze, expand) in fires.items():
        x = _fire(n, i, x, squeeze, expand)
        if i in pools_after:
            x = n.pool(f"pool{i}", x, "MAX", 3, 2)
    x = n.dropout_("drop9", x, 0.5)
    x = n.relu("relu_conv10", n.conv("conv10", x, n.num_classes, 1, weight=gaussian(0.01)))
    n.classifier(n.pool("pool10", x, "AVE"))


def squeezenet1_0(n: NetBuilder) -> None:
    _squeezenet(n, "1.0")


def squeezenet1_1(n: NetBuilder) -> None:
    _squeezenet(n, "1.1")


# name -> (body, default weight filler, default bias filler)
ARCHITECTURES: dict[str, tuple[Callable[[NetBuilder], None], str, str]] = {
    "caffenet": (caffenet, gaussian(0.01), constant(0)),
    "alexnet": (alexnet, gaussian(0.01), constant(0)),
    "vgg16": (vgg16, XAVIER, constant(0)),
    "nin": (nin, gaussian(0.01), constant(0)),
    "googlenet": (googlenet, XAVIER, constant(0.2)),
    "inception_bn": (inception_bn, XAVIER, constant(0)),
    "resnet50": (resnet50, MSRA, constant(0)),
    "resnet101": (resnet101, MSRA, constant(0)),
    "resnet152": (resnet152, MSRA, constant(0)),
    "preact_resnet18": (preact_resnet18, MSRA, constant(0)),
    "densenet121": (densenet121, MSRA, constant(0)),
    "mobilenet_v1": (mobilenet_v1, MSRA, constant(0)),
    "mobilenet_v2": (mobilenet_v2, MSRA, constant(0)),
    "squeezenet1_0": (squeezenet1_0, XAVIER, constant(0)),
    "squeezenet1_1": (squeezenet1_1, XAVIER, constant(0)),
}
NAMES: list[str] = list(ARCHITECTURES)

# the input size each architecture was published for (AlexNet's 11x11/4 first layer wants 227)
FULL_SIZE: dict[str, int] = {name: 227 if name in ("caffenet", "alexnet") else 224 for name in NAMES}


def zoo_net(name: str, batch: int = 1, size: int | None = None, *, train: bool = False, dropout: bool = True,
            num_classes: int = 1000) -> str:
    """Prototxt text of architecture `name` (one of NAMES) for a batch x 3 x size x size input.

    size: default FULL_SIZE[name]; small sizes work down to where every pooling still has an
      input (about 64 for most nets; see tests/zoo/test_zoo_parity.py for sizes that run).
    train: False gives the deploy net (ends in Softmax "prob"); True adds Input "label" (batch,)
      and SoftmaxWithLoss "loss" (GoogLeNet: also its two weighted auxiliary losses).
    dropout: False leaves out every Dropout layer (a deterministic TRAIN net).
    num_classes: width of the classifier.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture '{name}'; known: {', '.join(NAMES)}")
    body, weight, bias = ARCHITECTURES[name]
    n = NetBuilder(name, batch, FULL_SIZE[name] if size is None else size, train=train, dropout=dropout,
                   num_classes=num_classes, weight=weight, bias=bias)
    body(n)
    return n.text()
