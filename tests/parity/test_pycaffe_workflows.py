"""Caffe's own example workflows as pycaffe scripts, run unmodified by real pycaffe (`python
SCRIPT`) and by mpicaffe (`mpicaffe python SCRIPT`), on local data:

- "learning LeNet" (examples/01-learning-lenet): the net written with `caffe.layers`/NetSpec,
  trained with `solver.step`, test accuracy read from `solver.test_nets[0]`;
- "brewing logistic regression" (examples/brewing-logreg): HDF5Data written with h5py, a NetSpec
  logistic regression, then a two-layer net;
- the PASCAL multilabel example (examples/pascal-multilabel-with-datalayer): a Python data layer
  (`caffe.Layer`) feeding generated images with multi-hot labels to SigmoidCrossEntropyLoss;
- the Siamese network (examples/siamese): two towers sharing every parameter by name (`param {
  name: "conv1_w" }`), a Slice of pair data, ContrastiveLoss, trained with `solver.step`;
- DeepDream (google/deepdream's notebook, the best-known pycaffe script): gradient ascent on the
  input of GoogLeNet with `net.forward(end=...)`, a top's diff set by hand and
  `net.backward(start=...)`, on a generated image (96 px, random weights, no jitter).

The same script runs both times. Real pycaffe runs first and saves the solver's initial weights;
mpicaffe's run loads them (`solver.net.copy_from`), so both start from the same point and, with
no random draws left (no dropout, no shuffling, no random crops), follow the same trajectory.
Tolerance: every loss and the final accuracies within rtol 1e-3 / atol 1e-5 after 30 SGD steps,
for float32 sums in a different order (BLAS vs oneDNN) compounded over the steps; the largest
difference measured was about 1e-5 relative.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.mpi_harness import mpi_env
from tests.real_caffe import import_pycaffe

STEPS = 30

COMMON = r'''
import json
import os
import sys

import numpy as np
import caffe
from caffe import layers as L, params as P

out, init = sys.argv[1], sys.argv[2]
caffe.set_mode_cpu()


def write(path, net):
    with open(path, "w") as f:
        f.write(str(net.to_proto()))


def solver_file(path, train, test, base_lr, test_iter):
    with open(path, "w") as f:
        f.write(f'train_net: "{train}"\ntest_net: "{test}"\ntest_iter: {test_iter}\ntest_interval: 100000\n'
                f'base_lr: {base_lr}\nmomentum: 0.9\nweight_decay: 0.0005\nlr_policy: "inv"\ngamma: 0.0001\n'
                f'power: 0.75\nmax_iter: 10000\nsnapshot_prefix: "{out}/snap"\nrandom_seed: 1\n')


def train(solver_path, steps, test_iter, score="accuracy"):
    solver = caffe.SGDSolver(solver_path)
    if os.path.exists(init):
        solver.net.copy_from(init)
    else:
        solver.net.save(init)
    losses = []
    for _ in range(steps):
        solver.step(1)
        losses.append(float(solver.net.blobs["loss"].data))
    solver.test_nets[0].share_with(solver.net)
    scores = [float(solver.test_nets[0].forward()[score]) for _ in range(test_iter)]
    print("RESULT " + json.dumps({"losses": losses, "score": float(np.mean(scores))}))
'''

LENET = COMMON + r'''
def lenet(lmdb, batch_size):
    n = caffe.NetSpec()
    n.data, n.label = L.Data(batch_size=batch_size, backend=P.Data.LMDB, source=lmdb,
                             transform_param=dict(scale=1. / 255), ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20, weight_filler=dict(type="xavier"))
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.conv2 = L.Convolution(n.pool1, kernel_size=5, num_output=50, weight_filler=dict(type="xavier"))
    n.pool2 = L.Pooling(n.conv2, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.fc1 = L.InnerProduct(n.pool2, num_output=500, weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.fc1, in_place=True)
    n.score = L.InnerProduct(n.relu1, num_output=10, weight_filler=dict(type="xavier"))
    n.loss = L.SoftmaxWithLoss(n.score, n.label)
    n.accuracy = L.Accuracy(n.score, n.label)
    return n


data = sys.argv[3]
write(f"{out}/lenet_train.prototxt", lenet(f"{data}/mnist_train_lmdb", 64))
write(f"{out}/lenet_test.prototxt", lenet(f"{data}/mnist_test_lmdb", 100))
solver_file(f"{out}/lenet_solver.prototxt", f"{out}/lenet_train.prototxt", f"{out}/lenet_test.prototxt", 0.01, 5)
train(f"{out}/lenet_solver.prototxt", int(sys.argv[4]), 5)
'''

LOGREG = COMMON + r'''
import h5py
from sklearn.datasets import make_classification

X, y = make_classification(n_samples=1200, n_features=4, n_redundant=0, n_informative=2,
                           n_clusters_per_class=2, hypercube=False, random_state=0)
for name, part in (("train", slice(0, 1000)), ("test", slice(1000, None))):
    with h5py.File(f"{out}/{name}.h5", "w") as f:
        f["data"] = X[part].astype(np.float32)
        f["label"] = y[part].astype(np.float32)
    with open(f"{out}/{name}.txt", "w") as f:
        f.write(f"{out}/{name}.h5\n")


def logreg(hdf5, batch_size, hidden):
    n = caffe.NetSpec()
    n.data, n.label = L.HDF5Data(batch_size=batch_size, source=hdf5, ntop=2)
    top = n.data
    if hidden:
        n.ip1 = L.InnerProduct(n.data, num_output=40, weight_filler=dict(type="xavier"))
        n.relu1 = L.ReLU(n.ip1, in_place=True)
        top = n.relu1
    n.ip2 = L.InnerProduct(top, num_output=2, weight_filler=dict(type="xavier"))
    n.accuracy = L.Accuracy(n.ip2, n.label)
    n.loss = L.SoftmaxWithLoss(n.ip2, n.label)
    return n


hidden = sys.argv[3] == "nonlinear"
write(f"{out}/train.prototxt", logreg(f"{out}/train.txt", 10, hidden))
write(f"{out}/test.prototxt", logreg(f"{out}/test.txt", 10, hidden))
solver_file(f"{out}/solver.prototxt", f"{out}/train.prototxt", f"{out}/test.prototxt", 0.01, 20)
train(f"{out}/solver.prototxt", int(sys.argv[4]), 20)
'''

MULTILABEL = COMMON + r'''
sys.path.insert(0, out)
with open(f"{out}/multilabel_layers.py", "w") as f:
    f.write("""
import json

import numpy as np
import caffe


class MultilabelData(caffe.Layer):
    # a Python data layer as in Caffe's PASCAL multilabel example: images and multi-hot labels
    def setup(self, bottom, top):
        params = json.loads(self.param_str)
        self.batch_size = params["batch_size"]
        data = np.load(params["source"])
        self.images, self.labels = data["images"], data["labels"]
        self.cursor = 0
        top[0].reshape(self.batch_size, *self.images.shape[1:])
        top[1].reshape(self.batch_size, self.labels.shape[1])

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        for i in range(self.batch_size):
            top[0].data[i, ...] = self.images[self.cursor]
            top[1].data[i, ...] = self.labels[self.cursor]
            self.cursor = (self.cursor + 1) % len(self.images)

    def backward(self, top, propagate_down, bottom):
        pass
""")

rng = np.random.RandomState(0)
n_images, classes = 240, 5
labels = (rng.rand(n_images, classes) < 0.35).astype(np.float32)
images = rng.rand(n_images, 3, 16, 16).astype(np.float32) * 0.2
for i in range(n_images):  # class k draws a bright square in its own corner or the centre
    for k in np.flatnonzero(labels[i]):
        r, c = [(0, 0), (0, 10), (10, 0), (10, 10), (5, 5)][k]
        images[i, k % 3, r:r + 6, c:c + 6] += 0.8
np.savez(f"{out}/multilabel.npz", images=images, labels=labels)


def net(batch_size):
    n = caffe.NetSpec()
    n.data, n.label = L.Python(module="multilabel_layers", layer="MultilabelData", ntop=2,
                               param_str=json.dumps({"batch_size": batch_size, "source": f"{out}/multilabel.npz"}))
    n.conv1 = L.Convolution(n.data, kernel_size=3, num_output=8, pad=1, weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.pool1 = L.Pooling(n.relu1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.score = L.InnerProduct(n.pool1, num_output=classes, weight_filler=dict(type="xavier"))
    n.loss = L.SigmoidCrossEntropyLoss(n.score, n.label)
    return n


write(f"{out}/train.prototxt", net(16))
write(f"{out}/test.prototxt", net(40))
solver_file(f"{out}/solver.prototxt", f"{out}/train.prototxt", f"{out}/test.prototxt", 0.05, 3)
train(f"{out}/solver.prototxt", int(sys.argv[4]), 3, score="loss")
'''


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mnist")
    subprocess.run([sys.executable, "-m", "mpicaffe", "convert", "mnist", "--out", str(folder)], check=True,
                   capture_output=True, timeout=600)
    return str(folder)


def _result(proc: subprocess.CompletedProcess, who: str) -> dict:
    assert proc.returncode == 0, f"{who}:\n{proc.stderr[-4000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0][len("RESULT "):])


def _run_both(tmp_path, body: str, arg: str) -> tuple[dict, dict]:
    import_pycaffe()
    script = tmp_path / "workflow.py"
    script.write_text(body)
    env = mpi_env({"GLOG_minloglevel": "2"})
    results = []
    for who in ("pycaffe", "mpicaffe"):
        out = tmp_path / who
        out.mkdir()
        command = [sys.executable] + (["-m", "mpicaffe", "python"] if who == "mpicaffe" else [])
        proc = subprocess.run([*command, str(script), str(out), str(tmp_path / "init.caffemodel"), arg, str(STEPS)],
                              capture_output=True, text=True, timeout=600, env=env, check=False)
        results.append(_result(proc, who))
    return results[0], results[1]


def _compare(caffe: dict, ours: dict) -> None:
    assert len(caffe["losses"]) == len(ours["losses"]) == STEPS
    np.testing.assert_allclose(ours["losses"], caffe["losses"], rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(ours["score"], caffe["score"], rtol=1e-3, atol=1e-5)


def test_learning_lenet_with_netspec_and_solver_step(tmp_path, mnist):
    caffe, ours = _run_both(tmp_path, LENET, mnist)
    _compare(caffe, ours)
    assert ours["score"] > 0.5  # 30 steps of LeNet on MNIST


@pytest.mark.parametrize("kind", ["linear", "nonlinear"])
def test_brewing_logistic_regression_on_hdf5_data(tmp_path, kind):
    caffe, ours = _run_both(tmp_path, LOGREG, kind)
    _compare(caffe, ours)
    assert ours["score"] > 0.6  # test accuracy after 30 steps (two classes)


SIAMESE = COMMON + r'''
BATCH = 16


def tower(n, data, suffix):
    """The example's LeNet tower, smaller (16x16 inputs); both towers name the same parameters."""
    def shared(name):
        return [dict(name=name + "_w", lr_mult=1), dict(name=name + "_b", lr_mult=2)]
    xavier = dict(type="xavier")
    conv1 = L.Convolution(data, num_output=8, kernel_size=5, weight_filler=xavier, param=shared("conv1"))
    pool1 = L.Pooling(conv1, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    conv2 = L.Convolution(pool1, num_output=16, kernel_size=3, weight_filler=xavier, param=shared("conv2"))
    pool2 = L.Pooling(conv2, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    ip1 = L.InnerProduct(pool2, num_output=64, weight_filler=xavier, param=shared("ip1"))
    relu1 = L.ReLU(ip1, in_place=True)
    ip2 = L.InnerProduct(relu1, num_output=10, weight_filler=xavier, param=shared("ip2"))
    feat = L.InnerProduct(ip2, num_output=2, weight_filler=xavier, param=shared("feat"))
    for name, top in (("conv1", conv1), ("pool1", pool1), ("conv2", conv2), ("pool2", pool2), ("ip1", ip1),
                      ("ip2", ip2), ("feat", feat)):
        setattr(n, name + suffix, top)
    return feat


n = caffe.NetSpec()
n.pair_data = L.Input(shape=dict(dim=[BATCH, 2, 16, 16]))
n.sim = L.Input(shape=dict(dim=[BATCH]))
n.data, n.data_p = L.Slice(n.pair_data, slice_param=dict(slice_dim=1, slice_point=[1]), ntop=2)
n.loss = L.ContrastiveLoss(tower(n, n.data, ""), tower(n, n.data_p, "_p"), n.sim,
                           contrastive_loss_param=dict(margin=1))
write(f"{out}/siamese.prototxt", n)
with open(f"{out}/solver.prototxt", "w") as f:
    # a fixed seed, so real Caffe draws the same initial weights every run: ContrastiveLoss divides
    # by each pair's distance, so an initialization with a near-identical dissimilar pair amplifies
    # rounding (one seed in six measured drifted by 2.7e-3 after 28 steps; seed 1: 1.7e-6)
    f.write(f'train_net: "{out}/siamese.prototxt"\nbase_lr: 0.01\nmomentum: 0.9\nlr_policy: "inv"\n'
            f'gamma: 0.0001\npower: 0.75\nmax_iter: 1000\nrandom_seed: 1\nsnapshot_prefix: "{out}/snap"\n')
solver = caffe.SGDSolver(f"{out}/solver.prototxt")
if os.path.exists(init):
    solver.net.copy_from(init)
else:
    solver.net.save(init)
# pairs of noisy copies of 4 prototypes: similar when both come from the same one
rng = np.random.default_rng(0)
prototypes = rng.uniform(0, 1, (4, 16, 16))
losses = []
for _ in range(int(sys.argv[4])):
    a, b = rng.integers(0, 4, BATCH), rng.integers(0, 4, BATCH)
    b[::2] = a[::2]
    pairs = np.stack([prototypes[a], prototypes[b]], axis=1) + rng.normal(0, 0.1, (BATCH, 2, 16, 16))
    solver.net.blobs["pair_data"].data[...] = pairs
    solver.net.blobs["sim"].data[...] = (a == b)
    solver.step(1)
    losses.append(float(solver.net.blobs["loss"].data))
params = solver.net.params
assert all(np.array_equal(params[k][j].data, params[k + "_p"][j].data) for k in ("conv1", "ip1", "feat") for j in (0, 1))
print("RESULT " + json.dumps({"losses": losses, "score": [float(np.abs(p.data).sum()) for k in params
                                                          for p in params[k]]}))
'''

DEEPDREAM = COMMON + r'''
def make_step(net, step_size=1.5, end="inception_4c/output"):
    """The notebook's make_step, without its random jitter: one step of gradient ascent on the
    L2 norm of `end`'s activations."""
    src, dst = net.blobs["data"], net.blobs[end]
    net.forward(end=end)
    dst.diff[:] = dst.data  # objective_L2
    net.backward(start=end)
    g = src.diff[0]
    src.data[:] += step_size / np.abs(g).mean() * g
    np.clip(src.data, -120, 135, out=src.data)
    return float(np.abs(g).mean()), float(0.5 * (dst.data ** 2).sum())


model = sys.argv[3]
if not os.path.exists(init):  # real pycaffe's run: the same random weights every time
    caffe.set_random_seed(1)
    caffe.Net(model, caffe.TEST).save(init)
net = caffe.Net(model, init, caffe.TEST)
rng = np.random.default_rng(0)
net.blobs["data"].data[...] = rng.uniform(-30, 30, net.blobs["data"].data.shape)
steps = [make_step(net) for _ in range(int(sys.argv[4]) // 10)]
print("RESULT " + json.dumps({"losses": [o for _, o in steps], "score": [g for g, _ in steps],
                              "image": net.blobs["data"].data[0, :, ::8, ::8].ravel().tolist()}))
'''


def test_siamese_network_with_shared_parameters(tmp_path):
    caffe, ours = _run_both(tmp_path, SIAMESE, "-")
    _compare(caffe, ours)
    assert np.mean(ours["losses"][-10:]) < np.mean(ours["losses"][:10])


def test_deepdream_gradient_ascent_on_googlenet(tmp_path):
    from tests.zoo.nets import zoo_net

    model = tmp_path / "googlenet_deploy.prototxt"
    # the notebook sets force_backward so that the data blob gets a diff
    model.write_text("force_backward: true\n" + zoo_net("googlenet", 1, 96))
    caffe, ours = _run_both(tmp_path, DEEPDREAM, str(model))
    assert len(ours["losses"]) == STEPS // 10 and ours["losses"][-1] > ours["losses"][0]
    np.testing.assert_allclose(ours["losses"], caffe["losses"], rtol=1e-3)
    np.testing.assert_allclose(ours["score"], caffe["score"], rtol=1e-3)
    np.testing.assert_allclose(ours["image"], caffe["image"], rtol=1e-3, atol=1e-3)


def test_multilabel_python_data_layer(tmp_path):
    caffe, ours = _run_both(tmp_path, MULTILABEL, "-")
    _compare(caffe, ours)
    assert np.mean(ours["losses"][-10:]) < np.mean(ours["losses"][:10])
    assert os.path.exists(tmp_path / "mpicaffe" / "multilabel_layers.py")
