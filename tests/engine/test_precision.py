"""`--precision fp32|bf16|fp16`: fp32 unchanged, bf16 and fp16 (loss-scaled) training on the CPU.

fp32 must give the losses the engine gave before precision existed, bit for bit; bf16 and fp16
train the bundled digits net to within ACCURACY_MARGIN of fp32's test accuracy (measured: fp32
0.9867, bf16 0.9833, fp16 0.99); the fp16 loss scaler skips, halves and grows as GradScaler, and a
skipped step leaves weights and history as they were; two ranks under mpirun agree on the weights.
"""
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from mpicaffe import prototxt
from mpicaffe.backends.engine.precision import LossScaler, autocast_dtype
from mpicaffe.backends.engine.solver import get_solver
from mpicaffe.config import TrainConfig
from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2
from tests.mpi_harness import run_mpi

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ACCURACY_MARGIN = 0.02  # bf16/fp16 final test accuracy on the digits net, at most this below fp32's

# conv, BatchNorm + Scale (run fused), ReLU, InnerProduct, SoftmaxWithLoss, on random data
SMALL_NET = """
layer { name: "data" type: "DummyData" top: "x" top: "label"
  dummy_data_param { shape { dim: 8 dim: 3 dim: 6 dim: 6 } shape { dim: 8 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 } } }
layer { name: "conv" type: "Convolution" bottom: "x" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc" }
"""
# the losses of 5 SGD steps of SMALL_NET (solver below) by the engine before --precision existed,
# on one thread (the last bits of a sum depend on how many threads share it)
FP32_LOSSES = ['0x1.d7b9cc0000000p-1', '0x1.b0c7e20000000p-2', '0x1.899f5e0000000p-3', '0x1.0238700000000p-4',
               '0x1.3446160000000p-7']

# every layer computes in float32 even under autocast (Scale's multiply is not autocast, the loss
# runs in float32), so fp16 differs from fp32 only by the loss scale: a power of two, exactly
FLOAT32_NET = """
layer { name: "data" type: "DummyData" top: "x" top: "t"
  dummy_data_param { shape { dim: 4 dim: 5 } shape { dim: 4 dim: 5 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "gaussian" std: 1 } } }
layer { name: "scale" type: "Scale" bottom: "x" top: "y"
  scale_param { axis: 1 filler { type: "gaussian" std: 1 } bias_term: true } }
layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }
"""


def _solver(net: str, precision: str = "fp32", extra: str = "", **kw):
    text = ("net_param {" + net + "}\n"
            'type: "SGD" base_lr: 0.1 momentum: 0.9 weight_decay: 0.001 lr_policy: "fixed" max_iter: 100 '
            "display: 0 random_seed: 5\n" + extra)
    param = prototxt.parse_text(text, caffe_pb2.SolverParameter(), "<test solver>")
    return get_solver(param, precision=precision, **kw)


def _losses(solver, steps: int = 5) -> list[float]:
    out = []
    for _ in range(steps):
        solver.step(1)
        out.append(solver.loss)
    return out


# --- (a) fp32 is Caffe's arithmetic, unchanged ---
@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_fp32_gives_the_losses_of_the_engine_before_precision_existed(one_thread):
    default = _solver(SMALL_NET)
    assert default.precision == "fp32" and default.loss_scaler is None
    assert all(net.autocast_dtype is None for net in [default.net, *default.test_nets])
    assert [float.hex(v) for v in _losses(default)] == FP32_LOSSES
    assert _losses(_solver(SMALL_NET, "fp32")) == [float.fromhex(h) for h in FP32_LOSSES]


def test_bf16_runs_the_convolution_in_bf16_and_the_loss_batchnorm_and_weights_in_float32(one_thread):
    solver = _solver(SMALL_NET, "bf16")
    losses = _losses(solver)
    assert losses != [float.fromhex(h) for h in FP32_LOSSES]   # the precision is really used
    assert np.allclose(losses, [float.fromhex(h) for h in FP32_LOSSES], rtol=0.05)
    net = solver.net
    solver.net.forward()
    assert net.blobs["ip"].tensor.dtype == torch.bfloat16
    assert net.blobs["loss"].tensor.dtype == torch.float32 and net.blobs["acc"].tensor.dtype == torch.float32
    assert net.flat_data.dtype == net.flat_diff.dtype == solver.history[0].dtype == torch.float32
    mean, var, factor = net.params["bn"]
    assert mean.data.dtype == np.float32 and factor.data[0] > 0 and np.isfinite(var.data).all()


# --- (c) fp16 loss scaling ---
def test_scaler_halves_and_skips_on_inf_and_grows_after_good_steps():
    scaler = LossScaler(init_scale=8.0, growth_interval=3)
    g = torch.tensor([8.0, -16.0])
    assert scaler.unscale_(g) and g.tolist() == [1.0, -2.0]
    bad = torch.tensor([1.0, float("inf")])
    assert not scaler.unscale_(bad) and scaler.scale == 4.0 and scaler.skipped == 1
    assert bad.tolist() == [1.0, float("inf")]               # left for the skipped step
    assert not scaler.unscale_(torch.tensor([float("nan")])) and scaler.scale == 2.0
    for _ in range(2):
        assert scaler.unscale_(torch.ones(2)) and scaler.scale == 2.0
    assert scaler.unscale_(torch.ones(2)) and scaler.scale == 4.0   # the third good step in a row
    assert not scaler.unscale_(torch.ones(2), agree=lambda found: True)   # another rank overflowed
    assert scaler.scale == 2.0 and scaler.good_steps == 0


def _learned(solver) -> torch.Tensor:
    """The learned weights (BatchNorm's statistics, written by every forward, left out)."""
    net = solver.net
    return torch.cat([net.flat_data[i.offset:i.offset + i.count] for i in net.param_infos if i.learnable])


def test_a_skipped_fp16_step_leaves_weights_and_history_unchanged():
    solver = _solver(SMALL_NET, "fp16")
    solver.step(2)
    weights, history = _learned(solver).clone(), solver.history[0].clone()
    scale = solver.loss_scaler.scale
    overflow = [True]
    # where the trainer averages the gradients: an overflow in one element
    solver.add_callback(lambda: None, lambda: overflow[0] and solver.net.flat_diff[3].fill_(float("inf")))
    solver.step(1)
    assert solver.iter == 3 and solver.loss_scaler.scale == scale / 2 and solver.loss_scaler.skipped == 1
    assert torch.equal(_learned(solver), weights) and torch.equal(solver.history[0], history)
    overflow[0] = False
    solver.step(1)
    assert not torch.equal(_learned(solver), weights) and torch.isfinite(solver.net.flat_data).all()
    assert solver.loss_scaler.skipped == 1


def test_every_rank_skips_when_the_agreement_says_another_rank_overflowed():
    solver = _solver(SMALL_NET, "fp16")
    seen = []
    solver.set_overflow_agreement(lambda found: seen.append(found) or True)
    weights = _learned(solver).clone()
    solver.step(1)
    assert seen == [False] and torch.equal(_learned(solver), weights) and solver.iter == 1


def test_fp16_loss_scaling_is_exact_with_iter_size_two():
    """Scaled, accumulated over iter_size, unscaled: the same update as fp32, bit for bit."""
    fp32 = _solver(FLOAT32_NET, "fp32", "iter_size: 2")
    fp32_losses = _losses(fp32)   # DummyData draws from the global RNG: one solver after the other
    fp16 = _solver(FLOAT32_NET, "fp16", "iter_size: 2")
    assert fp16.net.loss_scale == 1.0 and fp16.loss_scaler.scale == 2.0 ** 16
    assert _losses(fp16) == fp32_losses
    assert fp16.net.loss_scale == 2.0 ** 16 and fp16.loss_scaler.skipped == 0
    assert torch.equal(fp16.net.flat_data, fp32.net.flat_data) and torch.equal(fp16.history[0], fp32.history[0])


# --- (d) what each precision accepts ---
def test_precision_choices():
    assert autocast_dtype("fp32", "cpu") is None
    assert autocast_dtype("bf16", "cpu") is torch.bfloat16
    assert autocast_dtype("fp16", "cpu") is torch.float16   # accepted on the CPU: checks a run, no speed-up
    with pytest.raises(UserError, match="unknown precision"):
        autocast_dtype("fp8", "cpu")
    with pytest.raises(UserError, match="--precision bf16 needs the built-in engine"):
        TrainConfig(solver="s.prototxt", precision="bf16").check("caffe", 1)


# --- (b), (d), (e): the bundled digits net from the command line ---
@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    shutil.copytree(os.path.join(ROOT, "prototxt", "digits"), folder / "prototxt" / "digits")
    _cli(["convert", "digits", "--out", "data/digits"], folder)
    return folder


def _cli(args: list[str], cwd) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "mpicaffe", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc.stderr


def _final_accuracy(log: str) -> float:
    return float(re.findall(r"Test net output #0: accuracy = ([0-9.]+)", log)[-1])


def _solver_file(folder, name: str, max_iter: int) -> str:
    """The bundled digits solver with `max_iter` and snapshots under examples_out/<name>."""
    text = (folder / "prototxt/digits/digits_solver.prototxt").read_text()
    path = folder / f"{name}_solver.prototxt"
    path.write_text(text.replace("max_iter: 600", f"max_iter: {max_iter}")
                    .replace("examples_out/digits/", f"examples_out/{name}/"))
    (folder / "examples_out" / name).mkdir(parents=True)
    return str(path)


def _train(folder, precision: str) -> str:
    return _cli(["train", "--solver", _solver_file(folder, precision, 600), "--precision", precision], folder)


@pytest.fixture(scope="module")
def fp32_accuracy(digits):
    return _final_accuracy(_train(digits, "fp32"))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_digits_net_reaches_fp32_accuracy_in_low_precision(digits, fp32_accuracy, precision):
    log = _train(digits, precision)
    assert f"Precision {precision}: forward and backward under autocast" in log
    accuracy = _final_accuracy(log)
    assert fp32_accuracy >= 0.95 and accuracy >= fp32_accuracy - ACCURACY_MARGIN, (precision, accuracy, fp32_accuracy)


def _scored_accuracy(log: str) -> float:
    return float(re.findall(r"\] accuracy = ([0-9.]+)", log)[-1])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_test_and_time_take_the_precision(digits, fp32_accuracy, precision):
    # the fp32 run's last snapshot, scored on the 300 test images in each precision
    model = ["--model", "prototxt/digits/digits_train_val.prototxt", "--iterations", "3"]
    weights = ["--weights", "examples_out/fp32/digits_iter_600.caffemodel"]
    fp32_log = _cli(["test", *model, *weights], digits)
    low_log = _cli(["test", *model, *weights, "--precision", precision], digits)
    fp32, low = _scored_accuracy(fp32_log), _scored_accuracy(low_log)
    assert fp32 == fp32_accuracy and abs(low - fp32) <= ACCURACY_MARGIN, (precision, low, fp32)
    # the low precision really ran: its loss is not fp32's to the last printed digit
    assert f"Precision {precision}: the net runs under autocast" in low_log
    assert re.findall(r"Loss: (\S+)", low_log) != re.findall(r"Loss: (\S+)", fp32_log)
    log = _cli(["time", *model[:2], "--iterations", "2", "--precision", precision], digits)
    assert f"Precision {precision}: the net runs under autocast" in log
    assert "Average Forward-Backward" in log and re.search(r"conv1\tbackward: [0-9.]+ ms", log)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_two_ranks_train_in_low_precision_and_agree_on_the_weights(digits, precision):
    solver = _solver_file(digits, f"mpi_{precision}", 100)
    result = run_mpi(2, ["python", "-m", "mpicaffe", "train", "--solver", solver, "--precision", precision,
                         "--check-every", "1"], cwd=str(digits), timeout=180)
    log = result.rank_stderr(0)
    assert f"Precision {precision}" in log and "Optimization Done." in log
    assert _final_accuracy(log) >= 0.8   # test at iteration 100, global batch 64
