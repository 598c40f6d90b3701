"""The command line: subcommands, Caffe-style flags, errors without tracebacks."""
import os
import subprocess
import sys

import pytest

from mpicaffe.cli import main, normalize_argv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENET = os.path.join(ROOT, "prototxt/lenet/lenet_train_val.prototxt")


def test_normalize_argv_accepts_gflags_spellings():
    assert normalize_argv(["train", "-solver", "s.prototxt", "-weights=w.caffemodel", "-gpu", "0"]) == [
        "train", "--solver", "s.prototxt", "--weights=w.caffemodel", "--gpu", "0"]
    assert normalize_argv(["x", "--sigint_effect=stop", "-sighup_effect", "none"]) == [
        "x", "--sigint-effect=stop", "--sighup-effect", "none"]
    assert normalize_argv(["launch", "-np", "2", "--", "-solver", "-1"]) == [
        "launch", "--np", "2", "--", "-solver", "-1"]
    assert normalize_argv(["-1", "-x"]) == ["-1", "-x"]


def test_info_lists_layers_per_phase(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/ here: the layer list alone, and the reason as an error
    assert main(["info", LENET]) == 1
    out, err = capsys.readouterr()
    assert "mpicaffe info: error: the net cannot be built: " in err and "data/mnist/mnist_train_lmdb" in err
    assert "Net 'LeNet' (phase TRAIN): 10 layers" in out
    lines = out.splitlines()
    assert lines[1].split() == ["#", "name", "type", "bottoms", "tops"]
    assert lines[2].split() == ["0", "mnist", "Data", "data,", "label"]
    assert "accuracy" not in out
    assert lines[-1] == "(shapes, parameters and FLOPs need the net built, and it cannot be)"
    assert main(["info", LENET, "-phase", "TEST"]) == 1
    out = capsys.readouterr().out
    assert "(phase TEST): 11 layers" in out
    assert "9   accuracy  Accuracy         ip2, label  accuracy" in out.splitlines()


def test_info_shows_shapes_parameters_and_flops(capsys):
    assert main(["info", os.path.join(ROOT, "prototxt/lenet/lenet_deploy.prototxt")]) == 0
    lines = capsys.readouterr().out.splitlines()
    conv1 = next(line for line in lines if line.startswith("1  conv1"))
    # 64 x 20 x 20 x 20 outputs (24x24 crops), each 25 multiply-adds; 20 x 25 weights + 20 biases
    assert conv1.split()[-3:] == ["64x20x20x20", "520", f"{2 * 64 * 20 * 20 * 20 * 25:,}"]
    assert lines[-1].startswith("Total: 256,080 learnable parameters")


def test_user_error_exits_1_without_traceback(tmp_path):
    bad = tmp_path / "bad.prototxt"
    bad.write_text("layer { name: 'a' nonsense: 1 }\n")
    proc = subprocess.run([sys.executable, "-m", "mpicaffe", "info", str(bad)],
                          check=False, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert f"mpicaffe info: error: {bad}:1:" in proc.stderr and "nonsense" in proc.stderr


@pytest.mark.parametrize("layers, reason", [
    ('layer { name: "ip" type: "InnerProduct" bottom: "nowhere" top: "ip" inner_product_param { num_output: 2 } }',
     "unknown bottom blob 'nowhere'"),
    (('layer { name: "in" type: "Input" top: "a" top: "b" input_param { shape { dim: 2 dim: 3 } shape { dim: 2 '
      'dim: 4 dim: 5 } } }\nlayer { name: "cat" type: "Concat" bottom: "a" bottom: "b" top: "c" }'), "cat"),
    ('layer { name: "x" type: "NoSuchLayer" top: "x" }', "NoSuchLayer")])
def test_info_exits_1_on_a_net_that_cannot_be_built(tmp_path, capsys, layers, reason):
    net = tmp_path / "net.prototxt"
    net.write_text(layers + "\n")
    assert main(["info", str(net)]) == 1
    out, err = capsys.readouterr()
    assert "(shapes, parameters and FLOPs need the net built, and it cannot be)" in out
    assert err.startswith(f"mpicaffe info: error: the net cannot be built: {net}") and reason in err, err


def test_unknown_phase_is_a_user_error(capsys):
    assert main(["info", LENET, "--phase", "VALIDATE"]) == 1
    assert "unknown phase 'VALIDATE'" in capsys.readouterr().err


def test_iterations_must_be_a_positive_integer(capsys):
    import pytest

    for command in ("test", "time"):
        for n in ("0", "-3"):
            with pytest.raises(SystemExit) as exit_:
                main([command, "--model", LENET, "--iterations", n])
            assert exit_.value.code == 2
            assert f"--iterations: must be a positive integer (got {int(n)})" in capsys.readouterr().err


DUMMY_NET = ('layer { name: "data" type: "DummyData" top: "data" top: "label" dummy_data_param {\n'
             '  shape { dim: 4 dim: 3 } shape { dim: 4 } data_filler { type: "gaussian" }\n'
             '  data_filler { type: "constant" value: 1 } } }\n'
             'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 2 } }\n'
             'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }\n')


def _train_dummy(tmp_path, net: str, prefix: str) -> int:
    (tmp_path / "net.prototxt").write_text(net)
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{tmp_path / "net.prototxt"}"\nbase_lr: 0.1\nlr_policy: "fixed"\nmax_iter: 20\nsnapshot: 10\n'
        f'snapshot_prefix: "{prefix}"\n')
    return main(["train", "--solver", str(tmp_path / "solver.prototxt")])


def test_a_bad_manifest_is_refused_before_training_starts(tmp_path, capsys):
    (tmp_path / "s.manifest.json").write_text("[1, 2, 3]")
    assert _train_dummy(tmp_path, DUMMY_NET, str(tmp_path / "s")) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 's.manifest.json'}: not a readable snapshot manifest" in err
    assert not list(tmp_path.glob("s_iter_*"))  # refused before the first iteration, not after training


def test_an_empty_weights_file_is_refused_not_scored_as_random_weights(tmp_path, capsys):
    net = tmp_path / "net.prototxt"
    net.write_text(DUMMY_NET)
    empty = tmp_path / "trained.caffemodel"
    empty.write_bytes(b"")
    assert main(["test", "--model", str(net), "--weights", str(empty), "--iterations", "1"]) == 1
    assert f"{empty}: holds no layers, so no weights for this net" in capsys.readouterr().err


def test_a_train_net_without_layers_or_loss_is_refused(tmp_path, capsys):
    # Caffe trains both with loss 0 and writes snapshots
    assert _train_dummy(tmp_path, 'name: "empty"\n', str(tmp_path / "s")) == 1
    assert "the train net has no layers (in the TRAIN phase, level 0, stages []): nothing to train" in capsys.readouterr().err
    assert _train_dummy(tmp_path, DUMMY_NET.split('layer { name: "loss"')[0], str(tmp_path / "s")) == 1
    assert "the train net computes no loss" in capsys.readouterr().err
    assert not list(tmp_path.glob("s_iter_*"))


def test_a_snapshot_folder_that_cannot_be_written_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "not_a_folder").write_text("a file where the snapshot folder should be")
    prefix = tmp_path / "not_a_folder" / "snap"
    assert _train_dummy(tmp_path, DUMMY_NET, str(prefix)) == 1
    err = capsys.readouterr().err
    assert f"snapshot_prefix {prefix}: cannot write snapshots in {prefix.parent}" in err
    assert "Iteration 0" not in err
    # a missing folder is made
    assert _train_dummy(tmp_path, DUMMY_NET, str(tmp_path / "made" / "snap")) == 0
    assert (tmp_path / "made" / "snap_iter_20.caffemodel").is_file()


def test_stage_takes_caffes_comma_separated_list(tmp_path, capsys):
    from mpicaffe.cli import build_parser

    args = build_parser().parse_args(["train", "--solver", "s.prototxt", "--stage", "a,b", "--stage", "c"])
    assert args.stage == ["a", "b", "c"]
    net = tmp_path / "staged.prototxt"
    net.write_text('layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 1 } } }\n'
                   + "".join(f'layer {{ name: "{s}" type: "ReLU" bottom: "x" top: "{s}" include {{ stage: "{s}" }} }}\n'
                             for s in "abc"))
    assert main(["info", str(net), "--stage", "a,b"]) == 0
    out = capsys.readouterr().out
    assert "3 layers" in out and " a " in out and " b " in out and " c " not in out


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["info", "--help"], ["launch", "--help"],
                                  ["prune", "--help"], ["convert", "digits", "--help"]])
def test_commands_that_do_not_train_import_no_torch(argv):
    # `mpicaffe --help` took 1.5-2.3 s importing torch (an optional extra) through the prune flags
    code = ("import sys\nfrom mpicaffe.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'mpi4py' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert proc.stdout.splitlines()[-1] == "False False"


def test_the_lowest_declared_python_is_the_one_tested():
    # requires-python said >=3.9 while the code needs 3.10 (`isinstance(e, A | B)`): CI runs the
    # lowest version pyproject.toml declares, so the declaration is tested
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        declared = tomllib.load(f)["project"]["requires-python"]
    assert declared.startswith(">=")
    lowest = tuple(int(part) for part in declared[2:].split("."))
    assert sys.version_info[:2] == lowest, f"tests run on {sys.version_info[:2]}, pyproject declares {declared}"


def test_test_without_weights_is_refused_as_caffe_refuses_it(capsys):
    # `caffe test` CHECKs "Need model weights to score."; mpicaffe scored random weights
    assert main(["test", "--model", LENET]) == 1
    assert "mpicaffe test: error: Need model weights to score" in capsys.readouterr().err


def test_device_query_needs_a_device_and_names_what_is_missing(capsys):
    assert main(["device_query"]) == 1
    assert "mpicaffe device_query: error: Need a device ID to query" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():  # this machine: the GPU path is in scripts/gpu_check.sh
        assert main(["device_query", "-gpu", "all"]) == 1
        assert "--gpu all: no CUDA device is available to PyTorch" in capsys.readouterr().err


def _train_log(tmp_path, capsys, solver: str) -> str:
    (tmp_path / "net.prototxt").write_text(DUMMY_NET)
    (tmp_path / "solver.prototxt").write_text(f'net: "{tmp_path / "net.prototxt"}"\n{solver}'
                                              f'snapshot_prefix: "{tmp_path / "s"}"\n')
    assert main(["train", "--solver", str(tmp_path / "solver.prototxt")]) == 0
    return capsys.readouterr().err


def test_train_logs_the_solver_as_written_and_caffes_closing_lines(tmp_path, capsys):
    log = _train_log(tmp_path, capsys, 'base_lr: 0.1\nlr_policy: "fixed"\nmax_iter: 10\ndisplay: 5\nsnapshot: 10\n'
                                       'test_iter: 2\ntest_interval: 5\n')
    dump = log.split("Initializing solver from parameters:", 1)[1].split("Solver scaffolding done.")[0]
    # the file's values, not the ones the trainer runs the solver with (display 0, test_interval
    # 2147483647, snapshot 0: it displays, tests and snapshots itself)
    assert "display: 5" in dump and "test_interval: 5" in dump and "snapshot: 10" in dump
    assert "2147483647" not in dump
    # Caffe's Solve(): after the last step, a forward pass shows the final loss, then a test
    lines = [line.split("] ", 1)[1] for line in log.splitlines() if "] " in line]
    end = lines[lines.index("Optimization Done.") - 4:]
    assert end[0].startswith("Iteration 10, loss = ")
    assert end[1] == "Iteration 10, Testing net (#0)"


def test_max_iter_0_still_runs_caffes_test(tmp_path, capsys):
    log = _train_log(tmp_path, capsys, 'base_lr: 0.1\nlr_policy: "fixed"\nmax_iter: 0\ntest_iter: 1\n'
                                       'test_interval: 5\ntest_initialization: false\n')
    assert "Iteration 0, Testing net (#0)" in log and "Test net output #0: loss = " in log


def test_train_gpu_list_starts_one_rank_per_gpu_through_mpirun(monkeypatch, tmp_path):
    # Caffe's `caffe train -gpu 0,1`: here no GPU exists, so CUDA's answers are stood in for and
    # the exec is caught; the ranks' own device choice is mpicaffe.devices.select_device's
    import torch

    from mpicaffe import cli

    monkeypatch.delenv(cli.GPU_RANKS_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    started = []
    monkeypatch.setattr(os, "execvpe", lambda file, argv, env: started.append(argv) if env[cli.GPU_RANKS_ENV] else None)
    monkeypatch.setattr(cli.signals, "catch", lambda: (_ for _ in ()).throw(SystemExit(0)))  # stop after the exec
    for gpu, ranks in (("0,1", 2), ("all", 4)):
        with pytest.raises(SystemExit):
            main(["train", "-solver", "s.prototxt", "-gpu", gpu])
        assert started.pop() == ["mpirun", "-np", str(ranks), *(["--allow-run-as-root"] if os.geteuid() == 0 else []),
                                 "-x", cli.GPU_RANKS_ENV, sys.executable, "-m", "mpicaffe", "train", "--solver",
                                 "s.prototxt", "--gpu", gpu]
    with pytest.raises(SystemExit):  # one GPU: one process, as before
        main(["train", "-solver", "s.prototxt", "-gpu", "1"])
    assert started == []


def test_train_gpu_list_without_cuda_is_a_clear_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["train", "--solver", "s.prototxt", "--gpu", "0,1"]) == 1
    assert capsys.readouterr().err == "mpicaffe train: error: --gpu 0,1: no CUDA device is available to PyTorch\n"
