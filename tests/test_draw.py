"""`mpicaffe draw` and caffe.draw: nets drawn with graphviz as pycaffe draws them. Parity of the
graph with real pycaffe's draw is in tests/parity/test_pycaffe_netspec_parity.py."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

from mpicaffe import draw, prototxt
from mpicaffe.cli import main
from mpicaffe.proto import caffe_pb2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENET = "prototxt/lenet/lenet_train_val.prototxt"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _require(ok: bool, what: str) -> None:
    """pydot and graphviz come with scripts/setup.sh: missing, fail in CI and skip elsewhere."""
    if not ok:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{what} is required in CI (scripts/setup.sh installs it)")
        pytest.skip(f"{what} is not installed (scripts/setup.sh installs it)")


@pytest.fixture
def pydot():
    _require(importlib.util.find_spec("pydot") is not None, "pydot")
    import pydot

    return pydot


@pytest.fixture
def graphviz(pydot):
    _require(shutil.which("dot") is not None, "graphviz's dot")


def _run(*args: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mpicaffe", "draw", *args], check=False, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_mpicaffe_draw_writes_a_png_that_graphviz_drew(graphviz, tmp_path):
    out = tmp_path / "lenet.png"
    r = _run(LENET, "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"Drawing net to {out}\n"
    png = out.read_bytes()
    assert png.startswith(PNG_SIGNATURE) and png[12:16] == b"IHDR"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width > 4 * height > 0               # LeNet's layers side by side (rankdir LR)
    # graphviz parsed the graph: its own dot output has the layout and every layer
    laid_out = tmp_path / "lenet.dot"
    assert _run(LENET, "-o", str(laid_out)).returncode == 0
    text = laid_out.read_text()
    assert text.startswith("digraph LeNet {") and "bb=" in text and "pos=" in text
    for label in (r"conv1\n(Convolution)\nkernel size: 5\nstride: 1\npad: 0", r"pool2\n(Pooling MAX)",
                  r"ip2\n(InnerProduct)", r"relu1\n(ReLU)", "Batch 64"):
        assert label in text


def test_rankdir_phase_and_lr_mult_options_are_honoured(graphviz, tmp_path):
    out = tmp_path / "test.svg"
    r = _run(LENET, str(out), "-rankdir", "TB", "--phase", "test", "--display_lrm")  # Caffe's spellings
    assert r.returncode == 0, r.stderr
    svg = out.read_text()
    assert "<svg" in svg and "<title>LeNet</title>" in svg
    assert "accuracy (Accuracy)" in svg                       # TEST-only layer, words on one line (TB)
    assert "Batch 100" in svg and "Batch 64" not in svg       # the TEST data layer only
    assert "lr mult: 1.0, 2.0" in svg
    dot = tmp_path / "train.dot"
    assert _run(LENET, "-o", str(dot), "--phase", "TRAIN").returncode == 0
    text = dot.read_text()
    assert "rankdir=LR" in text and "accuracy" not in text and "Batch 100" not in text


def test_get_pydot_graph_styles_layers_and_blobs_as_pycaffe(pydot):
    net = prototxt.read_net(os.path.join(ROOT, LENET))
    graph = draw.get_pydot_graph(net, "LR", phase=caffe_pb2.TRAIN, display_lrm=True)
    nodes = {n.get_name(): n.get_attributes() for n in graph.get_nodes()}
    conv1 = '"conv1\\n(Convolution)\\nkernel size: 5\\nstride: 1\\npad: 0\\nlr mult: 1.0, 2.0"'
    assert nodes[conv1] == {"shape": "record", "fillcolor": "#FF5050", "style": "filled"}
    assert nodes['"relu1\\n(ReLU)"']["fillcolor"] == "#90EE90"               # in place: a neuron
    assert nodes['"ip1\\n(InnerProduct)\\nlr mult: 1.0, 2.0"']["fillcolor"] == "#CC33FF"
    assert nodes["conv1"] == {"shape": "octagon", "fillcolor": "#E0E0E0", "style": "filled"}
    assert nodes["loss"] == {}                                                  # read by no layer
    edges = {(e.get_source(), e.get_destination()): e.get("label") for e in graph.get_edges()}
    assert edges[(conv1, "conv1")] == "20" and edges[("data", conv1)] == '""'
    assert graph.get("rankdir") == "LR" and graph.get_name() == "LeNet"


def test_draw_reports_bad_input_in_one_line(tmp_path, capsys):
    missing = str(tmp_path / "missing.prototxt")
    for args, message in [
        ([missing, "-o", str(tmp_path / "x.png")], f"{missing}: net file not found"),
        ([LENET, "-o", str(tmp_path / "x.bmpx")], "the extension names the format"),
        ([LENET], "give one output file"),
    ]:
        assert main(["draw", os.path.join(ROOT, args[0]), *args[1:]]) == 1
        err = capsys.readouterr().err
        assert err.startswith("mpicaffe draw: error: ") and message in err and err.count("\n") == 1, err
    r = _run(LENET, "-o", "x.png", "--phase", "VAL")
    assert r.returncode == 2 and "invalid choice: 'VAL'" in r.stderr


def test_draw_names_what_to_install_when_pydot_or_graphviz_is_missing(monkeypatch, capsys, tmp_path):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pydot" else find_spec(name, *a))
    assert main(["draw", os.path.join(ROOT, LENET), "-o", str(tmp_path / "x.png")]) == 1
    assert capsys.readouterr().err == f"mpicaffe draw: error: {draw.PYDOT_MISSING}\n"
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert main(["draw", os.path.join(ROOT, LENET), "-o", str(tmp_path / "x.png")]) == 1
    assert capsys.readouterr().err == f"mpicaffe draw: error: {draw.DOT_MISSING}\n"
    assert not (tmp_path / "x.png").exists()


def test_mpicaffe_draw_loads_neither_torch_nor_the_engine(graphviz, tmp_path):
    code = ("import sys; from mpicaffe.cli import main; "
            f"assert main(['draw', {LENET!r}, '-o', {str(tmp_path / 'x.svg')!r}]) == 0; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('mpicaffe.caffe')))")
    r = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "[]"
