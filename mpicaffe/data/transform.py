"""Caffe's DataTransformer on numpy batches: crop, mirror, mean subtraction and scale.

For each image of a (N, C, H, W) batch, as DataTransformer::Transform computes it in float:

    out[c, y, x] = (in[c, h_off + y, w_off + x'] - mean) * scale

with x' = x, or crop_width - 1 - x when the image is mirrored. `mean` is the mean image at the
same source pixel (mean_file, which must have the uncropped size) or the channel's mean_value.
With crop_size the offsets are random in TRAIN and centered in TEST; mirror (when set) flips
each image with probability 1/2 in both phases, as Caffe does. The whole batch is computed with
array operations; random draws come from a numpy Generator seeded from torch.initial_seed() and
the shard rank, so a run is reproducible. For decoding and transforming in several threads,
`draw_images` makes a batch's draws (in one thread, in the same order as `transform_images`) and
`transform_image` applies them to one image at a time, giving the same values bit for bit.
"""
from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from mpicaffe.data import images, lmdb_io
from mpicaffe.data.mean_file import read_mean_file
from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2
from mpicaffe.prototxt import resolve_path

log = logging.getLogger(__name__)


def make_rng(rank: int = 0, stream: int = 0) -> np.random.Generator:
    """A Generator seeded from torch.initial_seed(), the shard rank and a stream number.

    Each use of randomness (transformations, shuffling, skipping) takes its own stream so that
    one does not shift the other's draws.
    """
    import torch

    return np.random.default_rng([torch.initial_seed(), int(rank), int(stream)])


class DataTransformer:
    """Caffe's DataTransformer (transform_param) applied to whole numpy batches."""

    def __init__(self, param: caffe_pb2.TransformationParameter, phase: int, *, base_dir: str = "",
                 source: str = "", rank: int = 0, error: Callable[[str], Exception] = UserError):
        """`base_dir`/`source`: where a relative mean_file is looked up after the working directory
        (the net file's folder) and the file named in errors; `error` builds the exception raised."""
        self.param = param
        self.phase = phase
        self._error = error
        if param.HasField("mean_file") and len(param.mean_value):
            raise error("transform_param: cannot specify mean_file and mean_value at the same time")
        self.mean: np.ndarray | None = None
        if param.HasField("mean_file"):
            path = find_file(param.mean_file, base_dir, "transform_param.mean_file", source, error)
            try:
                self.mean = read_mean_file(path)
            except UserError as e:
                raise error(f"transform_param.mean_file: {e}") from None
        self.mean_values = np.asarray(param.mean_value, dtype=np.float32)
        self.scale = np.float32(param.scale)
        self.crop_size = int(param.crop_size)
        self.rng = make_rng(rank)
        # (h_off, w_off, mirrored) of each image of the last batch, for inspection and tests
        self.last_draws: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._warned_force = False

    def reseed(self, rank: int) -> None:
        """Restart the random draws for shard `rank` (from torch.initial_seed() as it is now)."""
        self.rng = make_rng(rank)

    # --- decoding ---
    def decode(self, datum: caffe_pb2.Datum) -> np.ndarray:
        """A Datum's pixels as (C, H, W): uint8, or float32 for float_data records.

        Encoded records decode with the channels the image holds, or 3 (BGR) with force_color,
        1 with force_gray. Raises ValueError/OSError for a record that cannot be decoded.
        """
        force_color, force_gray = self.param.force_color, self.param.force_gray
        if datum.encoded:
            if force_color and force_gray:
                raise self._error("transform_param: cannot set both force_color and force_gray")
            if force_color or force_gray:
                with Image.open(io.BytesIO(datum.data)) as image:
                    image.load()
                    return images.image_to_array(image, color=force_color)
            return _decode_native(datum.data)
        if (force_color or force_gray) and not self._warned_force:
            # Caffe logs this for every raw record; once is enough
            log.warning("transform_param: force_color and force_gray apply only to encoded records")
            self._warned_force = True
        return lmdb_io.decode_datum(datum)[0]

    # --- shapes ---
    def output_shape(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """The (C, H, W) an image of `shape` (C, H, W) becomes (Caffe's InferBlobShape)."""
        out = self._output_shape_or_none(shape)
        if out is None:
            if len(shape) != 3 or shape[0] <= 0:
                raise self._error(f"an image must have shape (C, H, W) with C > 0, got {tuple(shape)}")
            raise self._error(f"transform_param.crop_size {self.crop_size} is larger than an image of "
                              f"{shape[1]}x{shape[2]}")
        return out

    def _output_shape_or_none(self, shape: Sequence[int]) -> tuple[int, int, int] | None:
        if len(shape) != 3 or shape[0] <= 0:
            return None
        channels, height, width = (int(s) for s in shape)
        crop = self.crop_size
        if crop:
            return (channels, crop, crop) if height >= crop and width >= crop else None
        return channels, height, width

    def _check(self, channels: int, height: int, width: int) -> None:
        self.output_shape((channels, height, width))
        if self.mean is not None and self.mean.shape != (channels, height, width):
            raise self._error(f"transform_param.mean_file has shape {self.mean.shape} but the images are "
                              f"{(channels, height, width)}; the mean must have the uncropped image size")
        if self.mean_values.size not in (0, 1, channels):
            raise self._error(f"transform_param: specify either 1 mean_value or as many as channels: "
                              f"{channels} (got {self.mean_values.size})")

    # --- transforming ---
    def transform(self, batch: np.ndarray) -> np.ndarray:
        """Transform a (N, C, H, W) uint8 or float batch into a new float32 (N, C, h, w) array."""
        if batch.ndim != 4:
            raise ValueError(f"expected a (N, C, H, W) batch, got shape {batch.shape}")
        n, channels, height, width = batch.shape
        self._check(channels, height, width)
        self.last_draws = self._draw(n, height, width)
        return self._apply(batch, self.last_draws)

    def _draw(self, n: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(h_off, w_off, mirrored) of `n` images of height x width, drawn in Caffe's order."""
        rng, crop = self.rng, self.crop_size
        # Caffe: do_mirror = mirror() && Rand(2), drawn in TRAIN and TEST alike
        mirrored = rng.integers(0, 2, size=n).astype(bool) if self.param.mirror else np.zeros(n, dtype=bool)
        if crop and self.phase == caffe_pb2.TRAIN:
            h_off = rng.integers(0, height - crop + 1, size=n)
            w_off = rng.integers(0, width - crop + 1, size=n)
        else:
            h_off = np.full(n, (height - crop) // 2 if crop else 0)
            w_off = np.full(n, (width - crop) // 2 if crop else 0)
        return h_off, w_off, mirrored

    def _apply(self, batch: np.ndarray, draws: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
        """The transform of a checked (N, C, H, W) batch with its draws, as whole-batch array operations."""
        n, channels, height, width = batch.shape
        h_off, w_off, mirrored = draws
        crop, mean = self.crop_size, self.mean
        if crop and self.phase == caffe_pb2.TRAIN:
            windows = np.lib.stride_tricks.sliding_window_view(batch, (crop, crop), axis=(2, 3))
            out = windows[np.arange(n), :, h_off, w_off].astype(np.float32)
            if mean is not None:
                mean_windows = np.lib.stride_tricks.sliding_window_view(mean, (crop, crop), axis=(1, 2))
                mean = mean_windows[:, h_off, w_off].transpose(1, 0, 2, 3)
        else:
            h0 = (height - crop) // 2 if crop else 0
            w0 = (width - crop) // 2 if crop else 0
            rows, cols = slice(h0, h0 + (crop or height)), slice(w0, w0 + (crop or width))
            out = batch[:, :, rows, cols].astype(np.float32)
            if mean is not None:
                mean = mean[:, rows, cols]
        if mean is not None:
            out -= mean
        elif self.mean_values.size:
            values = np.broadcast_to(self.mean_values, (channels,))
            out -= values[:, None, None]
        if self.scale != 1:
            out *= self.scale
        if mirrored.any():
            out[mirrored] = out[mirrored][..., ::-1]
        return out

    def draw_images(self, shapes: Sequence[Sequence[int]], names: Sequence[str] | None = None
                    ) -> tuple[tuple[int, int, int], tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The checks and random draws of `transform_images` for images of these (C, H, W) shapes,
        without transforming: (the output shape of one image, (h_off, w_off, mirrored) per image).

        Call in one thread, batch after batch: the draws depend on the order. `transform_image`
        then applies them to each image, in any thread and any order.
        """
        if not shapes:
            raise ValueError("no images to transform")
        first = tuple(shapes[0])
        if len(first) != 3:
            raise ValueError(f"expected (C, H, W) images, got shape {first}")
        if all(tuple(s) == first for s in shapes):
            self._check(*first)
            draws = self._draw(len(shapes), first[1], first[2])
            self.last_draws = draws
            return self.output_shape(first), draws
        want = self.output_shape(first)
        for i, shape in enumerate(shapes):
            if self._output_shape_or_none(shape) != want:
                name = names[i] if names is not None else f"image {i}"
                first_name = names[0] if names is not None else "image 0"
                raise self._error(f"{name} has shape {tuple(shape)} but {first_name}, the first of its batch, "
                                  f"has {first}; without crop_size all images of a batch must have the "
                                  "same size (resize them when converting)")
        # sizes differ but all crop to the same shape: the draws are per image
        per_image = []
        for shape in shapes:
            self._check(*shape)
            per_image.append(self._draw(1, shape[1], shape[2]))
        draws = tuple(np.concatenate(d) for d in zip(*per_image))
        self.last_draws = draws
        return want, draws

    def transform_image(self, image: np.ndarray, draws: tuple[np.ndarray, np.ndarray, np.ndarray], i: int,
                        out: np.ndarray) -> None:
        """Write image `i` of a batch, (C, H, W), transformed with the batch's `draws` (draw_images)
        into `out` (C, h, w) float32: the values `transform_images` gives it. Reads only the
        transformer's settings, so several threads may call it at once."""
        h_off, w_off, mirrored = draws
        h, w = int(h_off[i]), int(w_off[i])
        out_h, out_w = out.shape[1:]
        source = image[:, h:h + out_h, w:w + out_w]
        mean = None if self.mean is None else self.mean[:, h:h + out_h, w:w + out_w]
        if mirrored[i]:
            source = source[:, :, ::-1]
            mean = None if mean is None else mean[:, :, ::-1]
        out[...] = source
        if mean is not None:
            out -= mean
        elif self.mean_values.size:
            out -= np.broadcast_to(self.mean_values, (image.shape[0],))[:, None, None]
        if self.scale != 1:
            out *= self.scale

    def transform_images(self, arrays: Sequence[np.ndarray], names: Sequence[str] | None = None) -> np.ndarray:
        """Transform a list of (C, H, W) images into one float32 batch.

        As in Caffe, the first image fixes the batch shape: the others must give the same
        transformed shape (same size, or any size at least crop_size when cropping). Image by
        image: for 64 images of 3x256x256 cropped to 224 twice as fast as `transform` on their
        stack (no stacked copy, no gather through sliding windows); as fast for 3x32x32.
        """
        if not arrays:
            raise ValueError("no images to transform")
        shape, draws = self.draw_images([a.shape for a in arrays], names)
        out = np.empty((len(arrays),) + shape, dtype=np.float32)
        for i, a in enumerate(arrays):
            self.transform_image(a, draws, i, out[i])
        return out


def _decode_native(data: bytes) -> np.ndarray:
    """images.decode_image, returning a color image as a (C, H, W) BGR view of Pillow's pixels
    rather than a contiguous copy: two copies of each image fewer (the transform copies anyway)."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if image.mode == "RGB":
            return np.asarray(image)[:, :, ::-1].transpose(2, 0, 1)
        return images.image_to_array(image, None)


def find_file(path: str, base_dir: str, field: str, source: str,
              error: Callable[[str], Exception] = UserError) -> str:
    """prototxt.resolve_path (working directory, then `base_dir`), raising through `error` so that
    the message names the layer as well as the field."""
    try:
        return resolve_path(path, base_dir, field, source)
    except UserError as e:
        message = str(e)
        if message.startswith(f"{source}: "):
            message = message[len(source) + 2:]
        raise error(message) from None


def transformer_for_layer(param: caffe_pb2.LayerParameter, phase: int, source: str, rank: int = 0,
                          error: Callable[[str], Exception] = UserError) -> DataTransformer:
    """The DataTransformer of a data layer, resolving mean_file next to the net file `source`."""
    return DataTransformer(param.transform_param, phase, base_dir=os.path.dirname(source), source=source,
                           rank=rank, error=error)
