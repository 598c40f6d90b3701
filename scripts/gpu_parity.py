"""The engine on DEVICE against the engine on the CPU: LeNet and the BatchNorm ResNet-20, one
TRAIN-phase forward and backward from the same weights and inputs (TF32 off, so both compute in
float32). Prints one PASS or FAIL line per net (scripts/gpu_check.sh reads them).

    python scripts/gpu_parity.py cuda:0      (`cpu` checks the script itself: differences 0)
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from mpicaffe import prototxt
from mpicaffe.backends.engine.net import Net
from mpicaffe.proto import caffe_pb2

NETS = (("LeNet", "prototxt/lenet/lenet_deploy.prototxt"),
        ("ResNet-20", "prototxt/resnet20/resnet20_deploy.prototxt"))
# float32 on both sides, but other kernels (cuDNN against oneDNN) sum in other orders
OUTPUT_BOUND, GRADIENT_BOUND = 1e-4, 1e-3


def compare(path: str, device: str) -> tuple[float, float]:
    """Largest relative differences of the outputs and of the parameter gradients."""
    param = prototxt.net_for_phase(prototxt.read_net(path), caffe_pb2.TRAIN, 0, (), path)
    param.force_backward = True
    nets = [Net(param, device="cpu", source=path), Net(param, device=device, source=path)]
    nets[1].flat_data.data.copy_(nets[0].flat_data.data)
    rng = np.random.default_rng(0)
    inputs = {b: torch.from_numpy(rng.standard_normal(nets[0].blobs[b].shape).astype(np.float32))
              for b in nets[0].inputs}
    seeds = None
    for net in nets:
        for name, x in inputs.items():
            net.blobs[name].tensor.copy_(x)
        net.forward()
        # random top diffs (a softmax's gradient for equal ones is 0)
        seeds = seeds or {o: torch.from_numpy(rng.standard_normal(net.blobs[o].shape).astype(np.float32))
                          for o in net.outputs}
        for out, seed in seeds.items():
            net.blobs[out].diff_tensor.copy_(seed)
        net.backward()
    if not nets[0].flat_diff.abs().sum() > 0:
        raise AssertionError(f"{path}: backward left every parameter gradient at 0: nothing to compare")
    outputs = max(_relative(nets[0].blobs[o].tensor, nets[1].blobs[o].tensor) for o in nets[0].outputs)
    return outputs, _relative(nets[0].flat_diff, nets[1].flat_diff)


def _relative(reference: torch.Tensor, other: torch.Tensor) -> float:
    reference, other = reference.detach().cpu(), other.detach().cpu()
    return float((reference - other).abs().max() / (reference.abs().max() + 1e-12))


def main() -> int:
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda:0"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    failed = 0
    for name, path in NETS:
        outputs, gradients = compare(path, device)
        ok = outputs < OUTPUT_BOUND and gradients < GRADIENT_BOUND
        failed += not ok
        print(f"{'PASS' if ok else 'FAIL'} {name}: on {device} the outputs differ by {outputs:.2e} and the "
              f"gradients by {gradients:.2e} (relative to the largest; bounds {OUTPUT_BOUND:g}, {GRADIENT_BOUND:g})")
    return failed


if __name__ == "__main__":
    sys.exit(main())
