"""Caffe's log line contents and smoothed loss (mpicaffe.logs)."""
import numpy as np

from mpicaffe.logs import SmoothedLoss, format_float, output_lines


def test_format_float_prints_six_significant_digits_as_cpp_ostream():
    assert format_float(0.1) == "0.1"
    assert format_float(np.float32(2.3025851)) == "2.30259"
    assert format_float(1e-7) == "1e-07"
    assert format_float(123456789) == "1.23457e+08"


def test_output_lines_show_the_weighted_loss_only_for_loss_outputs():
    lines = output_lines("Test", ["accuracy", "loss"], [0.5, 0.25], [0, 2])
    assert lines == ["    Test net output #0: accuracy = 0.5", "    Test net output #1: loss = 0.25 (* 2 = 0.5 loss)"]


def _caffe_smoothed(losses, window):
    """Caffe's Solver::UpdateSmoothedLoss, transcribed: a vector indexed by iteration."""
    kept, smoothed = [], np.float32(0)
    for it, loss in enumerate(np.float32(x) for x in losses):
        if len(kept) < window:
            kept.append(loss)
            smoothed = np.float32((smoothed * np.float32(len(kept) - 1) + loss) / np.float32(len(kept)))
        else:
            idx = it % window
            smoothed = np.float32(smoothed + (loss - kept[idx]) / np.float32(window))
            kept[idx] = loss
    return smoothed


def test_smoothed_loss_is_caffes_running_window_bit_for_bit():
    losses = np.random.default_rng(0).uniform(0, 3, 50).astype(np.float32)
    for window in (1, 3, 7, 50, 80):
        s = SmoothedLoss(window)
        for n in range(1, len(losses) + 1):
            s.add(losses[n - 1])
            assert s.value == _caffe_smoothed(losses[:n], window), (window, n)
    # a window longer than the run is the mean of all, up to float32 rounding
    assert abs(float(s.value) - float(losses[-50:].mean())) < 1e-5


# --- glog's variables and flags (mpicaffe.logs.setup_logging, the CLI's logging flags) ---
def _convert(tmp_path, *flags: str, env: dict | None = None):
    import os
    import subprocess
    import sys

    full_env = {**os.environ, **(env or {})}
    for name in ("GLOG_minloglevel", "GLOG_log_dir", "GLOG_logtostderr"):
        if name not in (env or {}):
            full_env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "mpicaffe", "convert", "digits", "--out", str(tmp_path / "d"),
                           "--overwrite", *flags], env=full_env, capture_output=True, text=True, timeout=120,
                          check=False)


def test_glog_minloglevel_drops_the_info_lines(tmp_path):
    assert "] Wrote 1497 records" in _convert(tmp_path).stderr
    for how in ({"env": {"GLOG_minloglevel": "1"}}, {"flags": ["-minloglevel=1"]}):
        proc = _convert(tmp_path, *how.get("flags", []), env=how.get("env"))
        assert proc.returncode == 0 and "Wrote" not in proc.stderr, proc.stderr


def test_glog_log_dir_gets_glogs_files_and_logtostderr_keeps_them_on_stderr(tmp_path):
    import getpass
    import os
    import re
    import socket

    logs = tmp_path / "logs"
    logs.mkdir()
    proc = _convert(tmp_path, env={"GLOG_log_dir": str(logs)})
    assert proc.returncode == 0
    names = sorted(os.listdir(logs))
    assert names[0] == "mpicaffe.INFO" and len(names) == 2  # no warning: no WARNING file, as glog
    assert re.fullmatch(rf"mpicaffe\.{re.escape(socket.gethostname())}\.{getpass.getuser()}\.log\.INFO\."
                        r"\d{8}-\d{6}\.\d+", names[1])
    assert os.readlink(logs / "mpicaffe.INFO") == names[1]
    lines = (logs / names[1]).read_text().splitlines()
    assert lines[0].startswith("Log file created at: ") and lines[1].startswith("Running on machine: ")
    assert [line for line in lines if "Wrote" in line] == [line for line in proc.stderr.splitlines() if "Wrote" in line]

    (logs2 := tmp_path / "logs2").mkdir()
    assert _convert(tmp_path, "--log-dir", str(logs2), env={"GLOG_logtostderr": "1"}).returncode == 0
    assert os.listdir(logs2) == []


def test_logging_flags_go_before_or_after_the_command(tmp_path):
    from mpicaffe.cli import build_parser, normalize_argv

    parse = build_parser().parse_args
    assert parse(normalize_argv(["--verbose", "info", "n"])).verbose
    assert parse(normalize_argv(["info", "n", "--verbose"])).verbose
    assert parse(normalize_argv(["convert", "digits", "--out", "o", "-log_dir=x"])).log_dir == "x"
    proc = _convert(tmp_path, "--log-dir", str(tmp_path / "missing"))
    assert proc.returncode == 1
    assert f"mpicaffe convert: error: --log-dir {tmp_path}/missing: not a folder" in proc.stderr
