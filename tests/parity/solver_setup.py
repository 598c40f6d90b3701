"""A small training problem both backends run: an LMDB read in order and a two-layer MLP.

24 records of 1x4x4 uint8 images in 3 classes; batch 8, so every 3 iterations (iter_size 1)
the Data layer is back at the first record. The net exercises per-parameter lr_mult/decay_mult,
including a frozen parameter (lr_mult 0).
"""
from __future__ import annotations

import numpy as np

from mpicaffe.data import lmdb_io

RECORDS = 24
BATCH = 8

NET = """name: "mlp"
layer {{ name: "data" type: "Data" top: "data" top: "label"
  transform_param {{ scale: 0.01 }}
  data_param {{ source: "{db}" batch_size: 8 backend: LMDB }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  param {{ lr_mult: 1 decay_mult: 1 }} param {{ lr_mult: 2 decay_mult: 0 }}
  inner_product_param {{ num_output: 6 weight_filler {{ type: "gaussian" std: 0.5 }}
                         bias_filler {{ type: "constant" value: 0.1 }} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }}
layer {{ name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  param {{ lr_mult: 0.5 decay_mult: 2 }} param {{ lr_mult: 0 }}
  inner_product_param {{ num_output: 3 weight_filler {{ type: "gaussian" std: 0.5 }}
                         bias_filler {{ type: "gaussian" std: 0.2 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }}
"""

TYPES = ("Data", "InnerProduct", "ReLU", "SoftmaxWithLoss")


def write_problem(tmp_path) -> str:
    """Write the LMDB and the net into tmp_path; returns the net prototxt's path."""
    rng = np.random.default_rng(2024)
    images = rng.integers(0, 256, (RECORDS, 1, 4, 4), dtype=np.uint8)
    labels = rng.integers(0, 3, RECORDS)
    db = str(tmp_path / "train_lmdb")
    lmdb_io.write_datums(db, ((lmdb_io.datum_key(i), lmdb_io.array_to_datum(im, int(lab)))
                              for i, (im, lab) in enumerate(zip(images, labels))))
    net = tmp_path / "mlp.prototxt"
    net.write_text(NET.format(db=db))
    return str(net)


def write_solver(tmp_path, net: str, body: str, name: str = "solver") -> str:
    """A solver prototxt for `net` with the settings in `body` (no test nets, no display)."""
    path = tmp_path / f"{name}.prototxt"
    path.write_text(f'net: "{net}"\nrandom_seed: 1\nmax_iter: 20\ndisplay: 0\n'
                    f'snapshot_prefix: "{tmp_path}/{name}"\n{body}\n')
    return str(path)
