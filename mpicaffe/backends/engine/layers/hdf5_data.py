"""Caffe's HDF5Data and HDF5Output layers (hdf5_data_layer, hdf5_output_layer); both need h5py.

HDF5Data reads in its own forward, with no prefetch thread (Caffe's is not a prefetching layer
either), loading one whole listed file at a time as Caffe does.
"""
from __future__ import annotations

import os
import weakref

import numpy as np
import torch

from mpicaffe.backends.engine.layers import register
from mpicaffe.backends.engine.layers.base import Layer
from mpicaffe.backends.engine.layers.base_data import SHUFFLE_STREAM, check_batch_size
from mpicaffe.data.transform import find_file, make_rng
from mpicaffe.errors import UserError


def _h5py():
    try:
        import h5py
    except ImportError:
        raise UserError("HDF5 layers need h5py: pip install h5py (or mpicaffe[hdf5])") from None
    return h5py


@register
class HDF5DataLayer(Layer):
    """Caffe's HDF5Data layer: one top per dataset name, rows read in order across the listed files."""

    type = "HDF5Data"
    min_bottoms = max_bottoms = 0
    min_tops = 1

    def setup(self, bottoms: list[torch.Tensor]) -> None:
        p = self.param.hdf5_data_param
        if self.param.HasField("transform_param"):
            raise self.error("HDF5Data does not transform data; remove transform_param")
        if not p.source:
            raise self.error("hdf5_data_param.source is not set")
        self.list_path = find_file(p.source, os.path.dirname(self.source), "hdf5_data_param.source",
                                   self.source, self.error)
        try:
            with open(self.list_path, encoding="utf-8") as f:
                names = f.read().split()
        except (OSError, UnicodeDecodeError) as e:
            raise self.error(f"hdf5_data_param.source {self.list_path}: cannot read: {e}") from None
        if not names:
            raise self.error(f"Must have at least 1 HDF5 filename listed in {self.list_path}")
        list_dir = os.path.dirname(self.list_path)
        self.files = [find_file(n, list_dir, f"HDF5 file listed in {self.list_path}", self.source, self.error)
                      for n in names]
        self.batch_size = check_batch_size(self, p.batch_size, "hdf5_data_param.batch_size")
        arrays = self._load(self.files[0])
        self.item_shapes = [a.shape[1:] for a in arrays]
        self.rank = 0
        self._state = None

    def _load(self, path: str) -> list[np.ndarray]:
        h5py = _h5py()
        arrays = []
        try:
            with h5py.File(path, "r") as f:
                for name in self.param.top:
                    if name not in f or not isinstance(f[name], h5py.Dataset):
                        raise self.error(f"{path}: no dataset '{name}' (each top of HDF5Data names a dataset)")
                    ds = f[name]
                    if ds.dtype.kind not in "fiub" or ds.ndim < 1:
                        raise self.error(f"{path}: dataset '{name}' must be numeric with at least 1 axis "
                                         f"(got {ds.dtype}, shape {ds.shape})")
                    arrays.append(np.asarray(ds[()], dtype=np.float32))
        except OSError as e:
            raise self.error(f"{path}: cannot read HDF5 file: {e}") from None
        rows = arrays[0].shape[0]
        for name, a in zip(self.param.top, arrays):
            if a.shape[0] != rows:
                raise self.error(f"{path}: dataset '{name}' has {a.shape[0]} rows but "
                                 f"'{self.param.top[0]}' has {rows}")
        if rows == 0:
            raise self.error(f"{path}: the datasets have no rows")
        if hasattr(self, "item_shapes"):
            for name, a, shape in zip(self.param.top, arrays, self.item_shapes):
                if a.shape[1:] != shape:
                    raise self.error(f"{path}: dataset '{name}' has rows of shape {a.shape[1:]} but the "
                                     f"first file's have {shape}")
        return arrays

    def _start(self) -> dict:
        shuffle = self.param.hdf5_data_param.shuffle
        rng = make_rng(self.rank, SHUFFLE_STREAM)
        order = np.arange(len(self.files))
        if shuffle:
            rng.shuffle(order)
        state = {"rng": rng, "order": order, "file": 0}
        self._load_file(state)
        return state

    def _load_file(self, state: dict) -> None:
        arrays = self._load(self.files[state["order"][state["file"]]])
        rows = arrays[0].shape[0]
        state.update(arrays=arrays, row=0,
                     perm=state["rng"].permutation(rows) if self.param.hdf5_data_param.shuffle else np.arange(rows))

    def _next_epoch_of_file(self, state: dict) -> None:
        # Caffe's HDF5DataLayer::Next at the end of a file's rows
        shuffle = self.param.hdf5_data_param.shuffle
        if len(self.files) > 1:
            state["file"] += 1
            if state["file"] == len(self.files):
                state["file"] = 0
                if shuffle:
                    state["rng"].shuffle(state["order"])
            self._load_file(state)
        else:
            state["row"] = 0
            if shuffle:
                state["rng"].shuffle(state["perm"])

    def forward(self, bottoms: list[torch.Tensor]) -> list[torch.Tensor]:
        if self._state is None:
            self._state = self._start()
        state = self._state
        b = self.batch_size
        outs = [np.empty((b,) + shape, dtype=np.float32) for shape in self.item_shapes]
        filled = 0
        while filled < b:
            rows = state["arrays"][0].shape[0]
            take = min(b - filled, rows - state["row"])
            index = state["perm"][state["row"]:state["row"] + take]
            for out, array in zip(outs, state["arrays"]):
                out[filled:filled + take] = array[index]
            filled += take
            state["row"] += take
            if state["row"] == rows:
                self._next_epoch_of_file(state)
        return [torch.from_numpy(o).to(self.device) for o in outs]

    def infer_tops(self, bottoms: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.zeros((self.batch_size,) + shape, device=self.device) for shape in self.item_shapes]


def _legacy_shape(t: torch.Tensor) -> tuple[int, int, int, int]:
    # Caffe's num/channels/height/width: missing trailing axes count as 1
    shape = tuple(t.shape)
    return tuple(shape[i] if i < len(shape) else 1 for i in range(4))


@register
class HDF5OutputLayer(Layer):
    """Caffe's HDF5Output layer: writes its two bottoms to datasets "data" and "label" of a file.

    Caffe creates the file (truncating it) at setup and writes the datasets, shaped
    (num, channels, height, width), on the first forward; its second forward fails because the
    datasets exist. Here later forwards append their rows to the same datasets.
    """

    type = "HDF5Output"
    min_bottoms = max_bottoms = 2
    min_tops = max_tops = 0

    def setup(self, bottoms: list[torch.Tensor]) -> None:
        self.file_name = self.param.hdf5_output_param.file_name
        if not self.file_name:
            raise self.error("hdf5_output_param.file_name is not set")
        h5py = _h5py()
        try:
            self._file = h5py.File(self.file_name, "w")
        except OSError as e:
            raise self.error(f"hdf5_output_param.file_name: cannot create {self.file_name}: {e}") from None
        self._finalizer = weakref.finalize(self, self._file.close)

    def forward(self, bottoms: list[torch.Tensor]) -> list[torch.Tensor]:
        data, label = bottoms
        for name, t in (("data", data), ("label", label)):
            if t.dim() > 4:
                raise self.error(f"bottom '{name}' has {t.dim()} axes; HDF5Output writes blobs of at most 4")
        if _legacy_shape(data)[0] != _legacy_shape(label)[0]:
            raise self.error(f"data blob and label blob must have the same batch size "
                             f"({_legacy_shape(data)[0]} vs {_legacy_shape(label)[0]})")
        if not self._file:
            raise self.error(f"{self.file_name} was closed")
        for name, t in (("data", data), ("label", label)):
            array = t.detach().cpu().numpy().astype(np.float32).reshape(_legacy_shape(t))
            if name not in self._file:
                self._file.create_dataset(name, data=array, maxshape=(None,) + array.shape[1:], chunks=True)
                continue
            ds = self._file[name]
            if ds.shape[1:] != array.shape[1:]:
                raise self.error(f"cannot append rows of shape {array.shape[1:]} to dataset '{name}' of "
                                 f"{self.file_name} with rows of shape {ds.shape[1:]}")
            ds.resize(ds.shape[0] + array.shape[0], axis=0)
            ds[-array.shape[0]:] = array
        self._file.flush()
        return []

    def infer_tops(self, bottoms: list[torch.Tensor]) -> list[torch.Tensor]:
        return []

    def close(self) -> None:
        """Close the file (also done when the layer is collected)."""
        self._finalizer()
