"""Caffe's own Python tools, unedited: `python/classify.py` and `python/draw_net.py` as Caffe
installs them, run once by Python with real pycaffe and once by `mpicaffe python`, which gives
them mpicaffe's API for `import caffe`; the outputs must agree.

classify.py: predictions of a small net (real Caffe's random weights) on 3 PNG images, 10 crops
each (oversampling), relative 1e-5 (float32 sums in another order). The images are already of
--images_dim, so neither side resizes (pycaffe resizes with scikit-image, mpicaffe with Pillow).
draw_net.py: the graphviz source it writes (a .dot file) is the same text.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
from PIL import Image

from tests.parity.common import pycaffe, write_text
from tests.real_caffe import caffe_python_script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEPLOY = """name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 10 dim: 3 dim: 32 dim: 32 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 8 kernel_size: 5 stride: 2 weight_filler { type: "gaussian" std: 0.01 }
                      bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.05 } } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


def _run_both(script: str, args: list[str], cwd) -> None:
    """The script under Python with real pycaffe, then under `mpicaffe python`; `args` holds
    OUT where each writes its output (real.* and ours.*)."""
    env = dict(os.environ, GLOG_minloglevel="2", PYTHONPATH=ROOT)
    for who, argv in (("real", [sys.executable, script]), ("ours", [sys.executable, "-m", "mpicaffe", "python", script])):
        cmd = argv + [a.replace("OUT", who) for a in args]
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, f"{who}: {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr[-3000:]}"


def test_classify_py_predicts_as_with_pycaffe(tmp_path):
    real = pycaffe()
    write_text(tmp_path / "deploy.prototxt", DEPLOY)
    real.Net(str(tmp_path / "deploy.prototxt"), real.TEST).save(str(tmp_path / "tiny.caffemodel"))
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
    np.save(tmp_path / "mean.npy", np.array([104, 117, 123], np.float32))
    _run_both(caffe_python_script("classify.py"),
              ["images", "OUT.npy", "--model_def", "deploy.prototxt", "--pretrained_model", "tiny.caffemodel",
               "--images_dim", "40,40", "--mean_file", "mean.npy", "--input_scale", "0.02", "--ext", "png"], tmp_path)
    want, got = np.load(tmp_path / "real.npy"), np.load(tmp_path / "ours.npy")
    assert want.shape == (3, 5) and want.min() > 0.01  # not saturated: the comparison means something
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_draw_net_py_writes_the_graph_pycaffe_writes(tmp_path):
    pycaffe()
    net = os.path.join(ROOT, "prototxt", "lenet", "lenet_train_val.prototxt")
    _run_both(caffe_python_script("draw_net.py"), [net, "OUT.dot", "--rankdir", "TB", "--phase", "TRAIN",
                                                   "--display_lrm"], tmp_path)
    want = (tmp_path / "real.dot").read_text()
    assert "conv1" in want and "lr mult" in want.lower()
    assert (tmp_path / "ours.dot").read_text() == want
