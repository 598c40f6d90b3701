"""pycaffe's `caffe.io`: blob and datum conversions, image loading, and the Transformer."""
from __future__ import annotations

import numpy as np
from PIL import Image

from mpicaffe.data import lmdb_io, mean_file
from mpicaffe.proto import caffe_pb2


def blobproto_to_array(blob: caffe_pb2.BlobProto, return_diff: bool = False) -> np.ndarray:
    """A BlobProto's data (or diff) as a float32 array of its shape (legacy dims win, as in Caffe)."""
    if not return_diff:
        return mean_file.blobproto_to_array(blob)
    data_only = caffe_pb2.BlobProto()
    data_only.CopyFrom(blob)
    data_only.ClearField("data")
    data_only.data.extend(blob.diff)
    return mean_file.blobproto_to_array(data_only)


def array_to_blobproto(arr: np.ndarray, diff: np.ndarray | None = None) -> caffe_pb2.BlobProto:
    """A BlobProto with `shape` and float data (and diff) from numpy arrays."""
    blob = mean_file.array_to_blobproto(arr)
    if diff is not None:
        blob.diff.extend(np.asarray(diff, dtype=np.float32).ravel().tolist())
    return blob


def arraylist_to_blobprotovector_str(arraylist) -> bytes:
    vec = caffe_pb2.BlobProtoVector()
    vec.blobs.extend(array_to_blobproto(a) for a in arraylist)
    return vec.SerializeToString()


def blobprotovector_str_to_arraylist(data: bytes) -> list[np.ndarray]:
    vec = caffe_pb2.BlobProtoVector()
    vec.ParseFromString(data)
    return [blobproto_to_array(b) for b in vec.blobs]


def array_to_datum(arr: np.ndarray, label: int | None = None) -> caffe_pb2.Datum:
    """A Datum from a (C, H, W) array: uint8 as bytes, anything else as float_data; the label
    is left unset when None."""
    if np.asarray(arr).ndim != 3:
        raise ValueError("incorrect array shape: a datum holds a (C, H, W) array")
    datum = lmdb_io.array_to_datum(np.asarray(arr))
    if label is None:
        datum.ClearField("label")
    else:
        datum.label = int(label)
    return datum


def datum_to_array(datum: caffe_pb2.Datum) -> np.ndarray:
    """The (C, H, W) array of a Datum (not its label)."""
    return lmdb_io.decode_datum(datum)[0]


def load_image(filename: str, color: bool = True) -> np.ndarray:
    """An image as (H, W, 3) RGB (or (H, W, 1) gray) float32 in [0, 1], as pycaffe loads it."""
    with Image.open(filename) as im:
        arr = np.asarray(im.convert("RGB" if color else "L"), dtype=np.float32) / 255.0
    return arr if color else arr[:, :, np.newaxis]


def resize_image(im: np.ndarray, new_dims, interp_order: int = 1) -> np.ndarray:
    """Resize an (H, W, K) float image to new_dims=(height, width): bilinear, or nearest for order 0."""
    resample = Image.NEAREST if interp_order == 0 else Image.BILINEAR
    h, w = int(new_dims[0]), int(new_dims[1])
    channels = [np.asarray(Image.fromarray(im[:, :, k].astype(np.float32), mode="F").resize((w, h), resample))
                for k in range(im.shape[2])]
    return np.stack(channels, axis=2)


def oversample(images, crop_dims) -> np.ndarray:
    """Ten crops per image (four corners, center, and their mirrors), as pycaffe's oversample."""
    crop_h, crop_w = int(crop_dims[0]), int(crop_dims[1])
    out = []
    for im in images:
        h, w = im.shape[:2]
        starts = [(0, 0), (0, w - crop_w), (h - crop_h, 0), (h - crop_h, w - crop_w),
                  ((h - crop_h) // 2, (w - crop_w) // 2)]
        crops = [im[y:y + crop_h, x:x + crop_w] for y, x in starts]
        out.extend(crops + [c[:, ::-1] for c in crops])
    return np.asarray(out, dtype=np.float32)


class Transformer:
    """Turn (H, W, K) RGB float images into a net's (K, H, W) inputs and back, as pycaffe's.

    Order of preprocess: resize to the input size, transpose, channel swap, raw scale, mean
    subtraction, input scale.
    """

    def __init__(self, inputs: dict):
        self.inputs = {k: tuple(v) for k, v in inputs.items()}
        self.transpose, self.channel_swap, self.raw_scale, self.mean, self.input_scale = {}, {}, {}, {}, {}

    def _check(self, name: str) -> None:
        if name not in self.inputs:
            raise ValueError(f"{name} is not one of the net inputs: {list(self.inputs)}")

    def set_transpose(self, name: str, order) -> None:
        self._check(name)
        if len(order) != len(self.inputs[name]) - 1:
            raise ValueError("transpose order needs as many dimensions as the input")
        self.transpose[name] = tuple(order)

    def set_channel_swap(self, name: str, order) -> None:
        self._check(name)
        if len(order) != self.inputs[name][1]:
            raise ValueError("channel swap needs as many entries as the input has channels")
        self.channel_swap[name] = tuple(order)

    def set_raw_scale(self, name: str, scale: float) -> None:
        self._check(name)
        self.raw_scale[name] = scale

    def set_input_scale(self, name: str, scale: float) -> None:
        self._check(name)
        self.input_scale[name] = scale

    def set_mean(self, name: str, mean: np.ndarray) -> None:
        """Mean per channel (K,) or per pixel ((H, W) or (K, H, W), resized to the input's size as
        pycaffe does) of the input's (K, H, W) layout."""
        self._check(name)
        mean = np.asarray(mean)
        k = self.inputs[name][1]
        if mean.ndim == 1:
            if mean.shape[0] != k:
                raise ValueError("mean channels incompatible with input")
            mean = mean[:, np.newaxis, np.newaxis]
        else:
            shape = (1,) + mean.shape if mean.ndim == 2 else mean.shape
            if len(shape) != 3:
                raise ValueError("mean shape invalid: (K,), (H, W) or (K, H, W)")
            if tuple(shape) != tuple(self.inputs[name][1:]):
                mean = resize_image(mean.reshape(shape).transpose(1, 2, 0).astype(np.float32),
                                    self.inputs[name][2:]).transpose(2, 0, 1)
        self.mean[name] = mean

    def preprocess(self, name: str, data: np.ndarray) -> np.ndarray:
        self._check(name)
        x = np.asarray(data, dtype=np.float32)
        in_size = self.inputs[name][2:]
        if x.shape[:2] != in_size:
            x = resize_image(x, in_size)
        if name in self.transpose:
            x = x.transpose(self.transpose[name])
        if name in self.channel_swap:
            x = x[list(self.channel_swap[name]), :, :]
        if name in self.raw_scale:
            x = x * self.raw_scale[name]
        if name in self.mean:
            x = x - self.mean[name]
        if name in self.input_scale:
            x = x * self.input_scale[name]
        return x

    def deprocess(self, name: str, data: np.ndarray) -> np.ndarray:
        self._check(name)
        x = np.asarray(data, dtype=np.float32).squeeze()
        if name in self.input_scale:
            x = x / self.input_scale[name]
        if name in self.mean:
            x = x + self.mean[name]
        if name in self.raw_scale:
            x = x / self.raw_scale[name]
        if name in self.channel_swap:
            x = x[np.argsort(self.channel_swap[name]), :, :]
        if name in self.transpose:
            x = x.transpose(np.argsort(self.transpose[name]))
        return x
