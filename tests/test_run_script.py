"""`mpicaffe python SCRIPT`, one process: `import caffe` is mpicaffe's, the script's arguments and
exit status are its own, and mpicaffe's refusals are one line naming the script's line."""
from __future__ import annotations

import subprocess
import sys


def _run(tmp_path, body: str, *args: str) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(body)
    return subprocess.run([sys.executable, "-m", "mpicaffe", "python", str(script), *args],
                          capture_output=True, text=True, timeout=120, check=False)


def test_import_caffe_is_mpicaffes_and_the_arguments_are_the_scripts(tmp_path):
    proc = _run(tmp_path, "import sys\nimport caffe\nimport caffe.io\nfrom caffe.proto import caffe_pb2\n"
                          "print(caffe.__name__, caffe.io.__name__, caffe_pb2.__name__, __name__, sys.argv[1:])\n",
                "-weights=w", "--x_y", "z")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split(" ", 4) == ["mpicaffe.caffe", "mpicaffe.caffe.io", "mpicaffe.proto.caffe_pb2",
                                         "__main__", "['-weights=w', '--x_y', 'z']\n"]


def test_the_scripts_exit_status_is_the_commands(tmp_path):
    assert _run(tmp_path, "import sys\nsys.exit(3)\n").returncode == 3
    assert _run(tmp_path, "raise SystemExit\n").returncode == 0


def test_a_refusal_is_one_line_naming_the_scripts_line(tmp_path):
    proc = _run(tmp_path, "import caffe\n\nnet = caffe.Net('missing.prototxt', caffe.TEST)\n")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("mpicaffe python: error: ") and f"(at {tmp_path}/script.py:3)" in proc.stderr


def test_any_other_exception_shows_its_traceback(tmp_path):
    proc = _run(tmp_path, "def f():\n    raise KeyError('k')\nf()\n")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "KeyError: 'k'" in proc.stderr


def test_a_missing_script_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mpicaffe", "python", str(tmp_path / "nope.py")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1 and f"mpicaffe python: error: {tmp_path}/nope.py: no such script" in proc.stderr
