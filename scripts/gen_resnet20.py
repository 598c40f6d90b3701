#!/usr/bin/env python3
"""Write prototxt/resnet20/: ResNet-20 for 32x32 (and 28x28) images, as He et al. 2016 (section 4.2)
describe it for CIFAR-10, in BVLC layers.

A 3x3 convolution with 16 filters, then three stages of three basic blocks (two 3x3 convolutions
each) with 16, 32 and 64 filters, the first block of stages 2 and 3 halving the size with stride 2;
global average pooling and a 10-way InnerProduct: 6 * 3 + 2 = 20 weighted layers. Every
convolution is followed by BatchNorm and Scale (Caffe splits batch normalization in two), then
ReLU, except that a block's second ReLU comes after the Eltwise sum with the shortcut. BVLC layers
cannot zero-pad channels, so the two shortcuts that change shape are 1x1 stride-2 convolutions
(the paper's option B).

    python scripts/gen_resnet20.py            # rewrite the files
    python scripts/gen_resnet20.py --check    # exit 1 if the committed files differ
"""
from __future__ import annotations

import argparse
import os
import sys

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "prototxt", "resnet20")

# the bundled datasets it trains on (`mpicaffe convert NAME --out data/NAME`)
DATASETS = ("synth32", "mnist")


def data_layers(dataset: str) -> list[str]:
    layers = []
    for phase, batch in (("TRAIN", 64), ("TEST", 100)):
        split = phase.lower() if phase == "TRAIN" else "test"
        layers.append(f'''layer {{
  name: "data"
  type: "Data"
  top: "data"
  top: "label"
  include {{ phase: {phase} }}
  transform_param {{ mean_file: "data/{dataset}/{dataset}_mean.binaryproto" scale: 0.0078125 }}
  data_param {{ source: "data/{dataset}/{dataset}_{split}_lmdb" batch_size: {batch} backend: LMDB }}
}}''')
    return layers


def conv_bn(name: str, bottom: str, filters: int, kernel: int, stride: int, relu: bool) -> tuple[list[str], str]:
    """Convolution (no bias) -> BatchNorm -> Scale (with bias) [-> ReLU], all in place after the
    convolution; returns the layers and the top."""
    pad = kernel // 2
    layers = [f'''layer {{
  name: "{name}"
  type: "Convolution"
  bottom: "{bottom}"
  top: "{name}"
  convolution_param {{
    num_output: {filters}
    kernel_size: {kernel}
    stride: {stride}
    pad: {pad}
    bias_term: false
    weight_filler {{ type: "msra" }}
  }}
}}''', f'''layer {{
  name: "{name}_bn"
  type: "BatchNorm"
  bottom: "{name}"
  top: "{name}"
  # a shorter memory than the default 0.999, so that TEST-phase statistics follow short runs
  batch_norm_param {{ moving_average_fraction: 0.9 }}
}}''', f'''layer {{
  name: "{name}_scale"
  type: "Scale"
  bottom: "{name}"
  top: "{name}"
  scale_param {{ bias_term: true }}
}}''']
    if relu:
        layers.append(relu_layer(f"{name}_relu", name))
    return layers, name


def relu_layer(name: str, blob: str) -> str:
    return f'''layer {{
  name: "{name}"
  type: "ReLU"
  bottom: "{blob}"
  top: "{blob}"
}}'''


def body() -> list[str]:
    layers, top = conv_bn("conv1", "data", 16, 3, 1, relu=True)
    for stage, filters in enumerate((16, 32, 64), start=1):
        for block in range(3):
            name = f"res{stage}{'abc'[block]}"
            stride = 2 if stage > 1 and block == 0 else 1
            a, a_top = conv_bn(f"{name}_conv1", top, filters, 3, stride, relu=True)
            b, b_top = conv_bn(f"{name}_conv2", a_top, filters, 3, 1, relu=False)
            layers += a + b
            shortcut = top
            if stride != 1:
                proj, shortcut = conv_bn(f"{name}_proj", top, filters, 1, stride, relu=False)
                layers += proj
            layers.append(f'''layer {{
  name: "{name}"
  type: "Eltwise"
  bottom: "{shortcut}"
  bottom: "{b_top}"
  top: "{name}"
  eltwise_param {{ operation: SUM }}
}}''')
            layers.append(relu_layer(f"{name}_relu", name))
            top = name
    layers.append(f'''layer {{
  name: "pool"
  type: "Pooling"
  bottom: "{top}"
  top: "pool"
  pooling_param {{ pool: AVE global_pooling: true }}
}}''')
    layers.append('''layer {
  name: "fc10"
  type: "InnerProduct"
  bottom: "pool"
  top: "fc10"
  inner_product_param {
    num_output: 10
    weight_filler { type: "msra" }
    bias_filler { type: "constant" }
  }
}''')
    return layers


def train_val(dataset: str) -> str:
    head = (f"# ResNet-20 (He et al. 2016, CIFAR-10 variant) on the bundled {dataset} LMDBs:\n"
            f"# `mpicaffe convert {dataset} --out data/{dataset}`. Written by scripts/gen_resnet20.py.\n"
            f'name: "ResNet20"\n')
    tail = ['''layer {
  name: "loss"
  type: "SoftmaxWithLoss"
  bottom: "fc10"
  bottom: "label"
  top: "loss"
}''', '''layer {
  name: "accuracy"
  type: "Accuracy"
  bottom: "fc10"
  bottom: "label"
  top: "accuracy"
  include { phase: TEST }
}''']
    return head + "\n".join(data_layers(dataset) + body() + tail) + "\n"


def deploy() -> str:
    head = ("# ResNet-20 for one 32x32 color image, for classification. Written by scripts/gen_resnet20.py.\n"
            'name: "ResNet20"\ninput: "data"\ninput_shape { dim: 1 dim: 3 dim: 32 dim: 32 }\n')
    prob = '''layer {
  name: "prob"
  type: "Softmax"
  bottom: "fc10"
  top: "prob"
}'''
    return head + "\n".join(body() + [prob]) + "\n"


def solver(dataset: str) -> str:
    return f'''# ResNet-20 on {dataset}: SGD with momentum, the rate divided by 10 twice, as He et al. train it
# (scaled down to the 5,000-image bundled datasets). Written by scripts/gen_resnet20.py.
net: "prototxt/resnet20/resnet20_{dataset}_train_val.prototxt"
test_iter: 10          # 10 x batch 100 covers the 1,000 test images
test_interval: 200
base_lr: 0.1
momentum: 0.9
weight_decay: 0.0001
lr_policy: "multistep"
gamma: 0.1
stepvalue: 400
stepvalue: 550
display: 50
max_iter: 600
snapshot: 600
snapshot_prefix: "examples_out/resnet20/resnet20_{dataset}"
solver_mode: CPU
random_seed: 1
'''


def files() -> dict[str, str]:
    out = {"resnet20_deploy.prototxt": deploy()}
    for dataset in DATASETS:
        out[f"resnet20_{dataset}_train_val.prototxt"] = train_val(dataset)
        out[f"resnet20_{dataset}_solver.prototxt"] = solver(dataset)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a committed file differs")
    args = ap.parse_args()
    stale = []
    os.makedirs(OUT, exist_ok=True)
    for name, text in files().items():
        path = os.path.join(OUT, name)
        old = None
        if os.path.exists(path):
            with open(path) as f:
                old = f.read()
        if old != text:
            stale.append(name)
            if not args.check:
                with open(path, "w") as f:
                    f.write(text)
    if args.check and stale:
        print(f"stale: {', '.join(stale)} (run scripts/gen_resnet20.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
