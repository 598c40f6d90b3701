"""Prototxt I/O: round trips, error messages, NetState filtering, solver net resolution."""
import glob
import os

import pytest

from mpicaffe import prototxt
from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = sorted(glob.glob(os.path.join(ROOT, "prototxt", "*", "*.prototxt")))


def test_bundled_files_exist():
    names = {os.path.basename(p) for p in BUNDLED}
    for model in ("lenet", "digits", "cifar10_quick"):
        for kind in ("train_val", "deploy", "solver"):
            assert f"{model}_{kind}.prototxt" in names


@pytest.mark.parametrize("path", BUNDLED, ids=os.path.basename)
def test_bundled_prototxt_round_trips(path):
    reader = prototxt.read_solver if path.endswith("_solver.prototxt") else prototxt.read_net
    first = reader(path)
    text = prototxt.to_text(first)
    again = prototxt.parse_text(text, type(first)(), "<printed>")
    assert again == first
    assert prototxt.to_text(again) == text


@pytest.mark.parametrize("path", [p for p in BUNDLED if not p.endswith("_solver.prototxt")],
                         ids=os.path.basename)
def test_bundled_net_binary_round_trip_is_byte_identical(path, tmp_path):
    net = prototxt.read_net(path)
    out = tmp_path / "net.caffemodel"
    prototxt.write_binary(net, str(out))
    back = prototxt.read_net(str(out))
    assert back == net
    assert back.SerializeToString() == out.read_bytes()


def test_blob_and_solver_state_binary_round_trip(tmp_path):
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend([1, 3, 2, 2])
    blob.data.extend([0.5 * i for i in range(12)])
    prototxt.write_binary(blob, str(tmp_path / "mean.binaryproto"))
    back = prototxt.read_blob(str(tmp_path / "mean.binaryproto"))
    assert list(back.shape.dim) == [1, 3, 2, 2] and list(back.data) == list(blob.data)
    assert back.SerializeToString() == (tmp_path / "mean.binaryproto").read_bytes()

    state = caffe_pb2.SolverState(iter=1200, learned_net="lenet_iter_1200.caffemodel", current_step=2)
    state.history.add().CopyFrom(blob)
    prototxt.write_binary(state, str(tmp_path / "s.solverstate"))
    back = prototxt.read_solver_state(str(tmp_path / "s.solverstate"))
    assert back == state and back.iter == 1200 and back.history[0].data[3] == 1.5
    assert back.SerializeToString() == (tmp_path / "s.solverstate").read_bytes()


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_unknown_field_names_file_line_column_and_field(tmp_path):
    path = _write(tmp_path, "bad.prototxt", 'name: "x"\nlayer {\n  name: "a"\n  typo_field: 3\n}\n')
    with pytest.raises(UserError) as e:
        prototxt.read_net(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:4:3: ")
    assert "typo_field" in msg and "LayerParameter" in msg
    assert "mpicaffe." not in msg
    assert "    typo_field: 3\n      ^" in msg


def test_syntax_error_names_offending_token(tmp_path):
    path = _write(tmp_path, "bad.prototxt", 'name: "x"\nlayer {\n  name: "a"\n  top: }\n')
    with pytest.raises(UserError) as e:
        prototxt.read_net(path)
    assert f"{path}:4:" in str(e.value)
    assert "}" in str(e.value)


def test_bad_enum_value_is_named(tmp_path):
    path = _write(tmp_path, "bad.prototxt",
                  'layer { name: "p" type: "Pooling" pooling_param { pool: MAXIMUM } }\n')
    with pytest.raises(UserError, match=r"bad.prototxt:1:\d+: .*MAXIMUM"):
        prototxt.read_net(path)


def test_missing_and_binary_files_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="nope.prototxt: net file not found"):
        prototxt.read_net(str(tmp_path / "nope.prototxt"))
    garbage = tmp_path / "w.caffemodel"
    garbage.write_bytes(b"\xff\xff\xff\xff\xff")
    with pytest.raises(UserError, match="not a valid binary net file"):
        prototxt.read_net(str(garbage))
    binary_as_text = tmp_path / "w.prototxt"
    binary_as_text.write_bytes(b"\x0a\x03\xffab")
    with pytest.raises(UserError, match="not a text net file"):
        prototxt.read_net(str(binary_as_text))


FILTER_NET = """
name: "filters"
layer { name: "always" type: "Input" top: "x" }
layer { name: "train_only" type: "ReLU" bottom: "x" top: "a" include { phase: TRAIN } }
layer { name: "not_test" type: "ReLU" bottom: "x" top: "b" exclude { phase: TEST } }
layer { name: "level2" type: "ReLU" bottom: "x" top: "c" include { min_level: 2 } }
layer { name: "upto1" type: "ReLU" bottom: "x" top: "d" include { max_level: 1 } }
layer { name: "stage_ab" type: "ReLU" bottom: "x" top: "e" include { stage: "a" stage: "b" } }
layer { name: "not_b" type: "ReLU" bottom: "x" top: "f" include { not_stage: "b" } }
layer { name: "either" type: "ReLU" bottom: "x" top: "g"
        include { phase: TEST stage: "a" } include { phase: TRAIN } }
"""


@pytest.mark.parametrize("phase,level,stages,expected", [
    (caffe_pb2.TRAIN, 0, (), ["always", "train_only", "not_test", "upto1", "not_b", "either"]),
    (caffe_pb2.TEST, 0, (), ["always", "upto1", "not_b"]),
    (caffe_pb2.TEST, 2, (), ["always", "level2", "not_b"]),
    (caffe_pb2.TEST, 1, ("a",), ["always", "upto1", "not_b", "either"]),
    (caffe_pb2.TEST, 0, ("a", "b"), ["always", "upto1", "stage_ab", "either"]),
])
def test_filter_net_follows_caffe_rules(phase, level, stages, expected):
    net = prototxt.parse_text(FILTER_NET, caffe_pb2.NetParameter())
    filtered = prototxt.net_for_phase(net, phase, level, stages)
    assert [layer.name for layer in filtered.layer] == expected
    assert filtered.state.phase == phase and filtered.state.level == level
    assert list(filtered.state.stage) == list(stages)


def test_include_and_exclude_together_is_an_error():
    net = prototxt.parse_text('layer { name: "both" type: "ReLU" include { phase: TRAIN } '
                              'exclude { phase: TEST } }', caffe_pb2.NetParameter())
    with pytest.raises(UserError, match="layer 'both': specify either include rules or exclude rules"):
        prototxt.filter_net(net)


def test_lenet_phases():
    net = prototxt.read_net(os.path.join(ROOT, "prototxt/lenet/lenet_train_val.prototxt"))
    train = prototxt.net_for_phase(net, caffe_pb2.TRAIN)
    test = prototxt.net_for_phase(net, caffe_pb2.TEST)
    assert "accuracy" not in [layer.name for layer in train.layer]
    assert [layer.name for layer in test.layer][-2:] == ["accuracy", "loss"]
    assert train.layer[0].data_param.batch_size == 64 and test.layer[0].data_param.batch_size == 100


NET = 'name: "n"\nlayer { name: "d" type: "Input" top: "x" }\n'


def test_solver_net_resolved_from_cwd_then_solver_folder(tmp_path, monkeypatch):
    sub = tmp_path / "models"
    sub.mkdir()
    _write(sub, "net.prototxt", NET)
    solver_path = _write(sub, "solver.prototxt", 'net: "net.prototxt"\ntest_iter: 5\ntest_iter: 7\n')
    monkeypatch.chdir(tmp_path)
    nets = prototxt.solver_nets(prototxt.read_solver(solver_path), solver_path)
    assert nets.train_source == str(sub / "net.prototxt")
    assert nets.train.state.phase == caffe_pb2.TRAIN
    assert len(nets.tests) == 2 and all(n.state.phase == caffe_pb2.TEST for n in nets.tests)
    # a file of the same name in the working directory wins, as in Caffe
    _write(tmp_path, "net.prototxt", NET.replace('"n"', '"cwd"'))
    nets = prototxt.solver_nets(prototxt.read_solver(solver_path), solver_path)
    assert nets.train.name == "cwd"


def test_solver_states_merge_like_caffe(tmp_path):
    _write(tmp_path, "net.prototxt", 'state { stage: "base" }\n' + NET)
    solver_path = _write(tmp_path, "solver.prototxt",
                         f'net: "{tmp_path}/net.prototxt"\ntrain_state {{ level: 3 stage: "t" }}\n'
                         'test_iter: 1\ntest_state { stage: "v" }\n')
    nets = prototxt.solver_nets(prototxt.read_solver(solver_path), solver_path)
    assert list(nets.train.state.stage) == ["base", "t"] and nets.train.state.level == 3
    assert list(nets.tests[0].state.stage) == ["base", "v"] and nets.tests[0].state.phase == caffe_pb2.TEST


def test_solver_errors(tmp_path):
    missing = _write(tmp_path, "s1.prototxt", 'net: "absent.prototxt"\n')
    with pytest.raises(UserError, match=r"s1.prototxt: net: file not found: absent.prototxt"):
        prototxt.solver_nets(prototxt.read_solver(missing), missing)
    none = _write(tmp_path, "s2.prototxt", "base_lr: 0.1\n")
    with pytest.raises(UserError, match="must name a train net"):
        prototxt.solver_nets(prototxt.read_solver(none), none)
    _write(tmp_path, "net.prototxt", NET)
    two = _write(tmp_path, "s3.prototxt",
                 f'net: "{tmp_path}/net.prototxt"\ntrain_net: "{tmp_path}/net.prototxt"\n')
    with pytest.raises(UserError, match="more than once"):
        prototxt.solver_nets(prototxt.read_solver(two), two)
    iters = _write(tmp_path, "s4.prototxt",
                   f'train_net: "{tmp_path}/net.prototxt"\ntest_net: "{tmp_path}/net.prototxt"\n')
    with pytest.raises(UserError, match="test_iter must be specified for each test network"):
        prototxt.solver_nets(prototxt.read_solver(iters), iters)


def test_inline_net_param(tmp_path):
    path = _write(tmp_path, "s.prototxt", 'net_param { name: "inline" layer { name: "d" type: "Input" } }\n')
    nets = prototxt.solver_nets(prototxt.read_solver(path), path)
    assert nets.train.name == "inline" and nets.tests == []


def test_solver_type_upgrade_on_read(tmp_path):
    path = _write(tmp_path, "s.prototxt", 'net: "n.prototxt"\nsolver_type: NESTEROV\n')
    solver = prototxt.read_solver(path)
    assert solver.type == "Nesterov" and not solver.HasField("solver_type")


def test_snapshot_prefix_defaults_like_caffe(tmp_path):
    path = _write(tmp_path, "my_solver.prototxt", 'net: "n.prototxt"\n')
    assert prototxt.read_solver(path).snapshot_prefix == str(tmp_path / "my_solver")
    (tmp_path / "snaps").mkdir()
    path = _write(tmp_path, "s2.prototxt", f'net: "n.prototxt"\nsnapshot_prefix: "{tmp_path}/snaps"\n')
    assert prototxt.read_solver(path).snapshot_prefix == str(tmp_path / "snaps" / "s2")
    path = _write(tmp_path, "s3.prototxt", 'net: "n.prototxt"\nsnapshot_prefix: "out/lenet"\n')
    assert prototxt.read_solver(path).snapshot_prefix == "out/lenet"
