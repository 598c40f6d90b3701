"""Caffe's DataTransformer (mpicaffe.data.transform) against a per-pixel numpy transcription of
DataTransformer::Transform: crop offsets, mirror, mean_file/mean_value, scale, decoding flags."""
import os

import numpy as np
import pytest
import torch

from mpicaffe.data import images, lmdb_io, mean_file
from mpicaffe.data.transform import DataTransformer
from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


def reference(img, h_off, w_off, mirror, crop, mean=None, mean_values=(), scale=1.0):
    """Caffe's loop: out[c, h, mirror ? width-1-w : w] = (x[c, h_off+h, w_off+w] - mean) * scale."""
    channels, height, width = img.shape
    out_h, out_w = (crop, crop) if crop else (height, width)
    values = list(mean_values) * channels if len(mean_values) == 1 else list(mean_values)
    scale = np.float32(scale)
    out = np.zeros((channels, out_h, out_w), np.float32)
    for c in range(channels):
        for h in range(out_h):
            for w in range(out_w):
                x = np.float32(img[c, h_off + h, w_off + w])
                if mean is not None:
                    v = (x - mean[c, h_off + h, w_off + w]) * scale
                elif values:
                    v = (x - np.float32(values[c])) * scale
                else:
                    v = x * scale
                out[c, h, out_w - 1 - w if mirror else w] = v
    return out


def make(phase=TRAIN, base_dir="", **fields):
    param = caffe_pb2.TransformationParameter()
    for k, v in fields.items():
        if k == "mean_value":
            param.mean_value.extend(v)
        else:
            setattr(param, k, v)
    return DataTransformer(param, phase, base_dir=base_dir, source="net.prototxt")


def batch(n=6, c=3, h=7, w=8, seed=0, dtype=np.uint8):
    rng = np.random.default_rng(seed)
    if dtype == np.uint8:
        return rng.integers(0, 256, size=(n, c, h, w), dtype=np.uint8)
    return rng.normal(size=(n, c, h, w)).astype(dtype)


def check_against_reference(t, x, out, **kw):
    h_off, w_off, mirrored = t.last_draws
    for i in range(len(x)):
        np.testing.assert_array_equal(out[i], reference(x[i], h_off[i], w_off[i], mirrored[i], t.crop_size, **kw))


def test_test_phase_crop_is_centered_with_mean_file_and_scale(tmp_path):
    x = batch()
    mean = np.random.default_rng(1).uniform(0, 255, size=(3, 7, 8)).astype(np.float32)
    mean_file.write_mean_file(str(tmp_path / "mean.binaryproto"), mean)
    t = make(TEST, base_dir=str(tmp_path), crop_size=4, mean_file="mean.binaryproto", scale=0.00390625)
    out = t.transform(x)
    assert out.shape == (6, 3, 4, 4) and out.dtype == np.float32
    h_off, w_off, mirrored = t.last_draws
    assert (h_off == 1).all() and (w_off == 2).all() and not mirrored.any()  # (7-4)//2, (8-4)//2
    for i in range(6):
        np.testing.assert_array_equal(out[i], reference(x[i], 1, 2, False, 4, mean=mean, scale=0.00390625))


def test_train_crop_mirror_mean_values_match_reference():
    torch.manual_seed(3)
    x = batch(n=64, h=6, w=9)
    t = make(TRAIN, crop_size=5, mirror=True, mean_value=[104, 117, 123], scale=2.0)
    out = t.transform(x)
    h_off, w_off, mirrored = t.last_draws
    assert set(h_off) == {0, 1} and set(w_off) == {0, 1, 2, 3, 4}  # all of Rand(H-crop+1), Rand(W-crop+1)
    assert 0 < mirrored.sum() < 64
    check_against_reference(t, x, out, mean_values=[104, 117, 123], scale=2.0)


def test_train_crop_subtracts_mean_file_at_the_crop_offset(tmp_path):
    x = batch(n=16)
    mean = np.arange(3 * 7 * 8, dtype=np.float32).reshape(3, 7, 8) / 7
    mean_file.write_mean_file(str(tmp_path / "m.binaryproto"), mean)
    t = make(TRAIN, crop_size=3, mirror=True, mean_file=str(tmp_path / "m.binaryproto"))
    out = t.transform(x)
    check_against_reference(t, x, out, mean=mean)


def test_mirror_applies_in_test_phase_too():
    # Caffe: do_mirror = param.mirror() && Rand(2), whatever the phase
    x = batch(n=400, c=1, h=2, w=3)
    t = make(TEST, mirror=True)
    out = t.transform(x)
    mirrored = t.last_draws[2]
    assert 150 < mirrored.sum() < 250
    check_against_reference(t, x, out)
    np.testing.assert_array_equal(out[mirrored], x[mirrored][..., ::-1].astype(np.float32))


def test_single_mean_value_and_float_data():
    x = batch(n=3, c=2, h=3, w=3, dtype=np.float32)
    t = make(TRAIN, mean_value=[0.25], scale=3.0)
    out = t.transform(x)
    check_against_reference(t, x, out, mean_values=[0.25], scale=3.0)
    plain = make(TRAIN).transform(x)
    np.testing.assert_array_equal(plain, x)
    assert not np.shares_memory(plain, x)


def test_draws_are_reproducible_and_depend_on_rank():
    x = batch(n=32)
    torch.manual_seed(11)
    a = make(TRAIN, crop_size=3, mirror=True)
    b = make(TRAIN, crop_size=3, mirror=True)
    np.testing.assert_array_equal(a.transform(x), b.transform(x))
    b.reseed(1)
    a.reseed(0)
    a.transform(x)
    b.transform(x)
    assert any((da != db).any() for da, db in zip(a.last_draws, b.last_draws))


def test_parameter_errors(tmp_path):
    mean_file.write_mean_file(str(tmp_path / "m.binaryproto"), np.zeros((3, 7, 8), np.float32))
    with pytest.raises(UserError, match="cannot specify mean_file and mean_value"):
        make(mean_file=str(tmp_path / "m.binaryproto"), mean_value=[1])
    with pytest.raises(UserError, match="transform_param.mean_file: file not found: nope.binaryproto"):
        make(mean_file="nope.binaryproto")
    with pytest.raises(UserError, match="either 1 mean_value or as many as channels: 3"):
        make(mean_value=[1, 2]).transform(batch())
    with pytest.raises(UserError, match="mean_file has shape"):
        make(mean_file=str(tmp_path / "m.binaryproto")).transform(batch(h=6))
    with pytest.raises(UserError, match="crop_size 9 is larger than an image of 7x8"):
        make(crop_size=9).transform(batch())


def test_images_of_different_sizes_crop_to_one_batch():
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, size=(3, h, w), dtype=np.uint8) for h, w in ((5, 6), (7, 5), (5, 6))]
    t = make(TEST, crop_size=4, mirror=True)
    out = t.transform_images(arrays)
    h_off, w_off, mirrored = t.last_draws
    assert list(h_off) == [0, 1, 0] and list(w_off) == [1, 0, 1]
    for i, a in enumerate(arrays):
        np.testing.assert_array_equal(out[i], reference(a, h_off[i], w_off[i], mirrored[i], 4))
    with pytest.raises(UserError, match="rec1 has shape .* but rec0, the first of its batch"):
        make(TEST).transform_images(arrays, names=["rec0", "rec1", "rec2"])


def test_decode_encoded_with_force_color_and_force_gray():
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, size=(3, 4, 5), dtype=np.uint8)
    gray = rng.integers(0, 256, size=(1, 4, 5), dtype=np.uint8)
    color_datum = lmdb_io.encoded_datum(images.encode_image(bgr, "png"))
    gray_datum = lmdb_io.encoded_datum(images.encode_image(gray, "png"))
    np.testing.assert_array_equal(make().decode(color_datum), bgr)
    np.testing.assert_array_equal(make().decode(gray_datum), gray)
    as_color = make(force_color=True).decode(gray_datum)
    assert as_color.shape == (3, 4, 5)
    np.testing.assert_array_equal(as_color, np.repeat(gray, 3, axis=0))
    assert make(force_gray=True).decode(color_datum).shape == (1, 4, 5)
    with pytest.raises(UserError, match="both force_color and force_gray"):
        make(force_color=True, force_gray=True).decode(color_datum)
    raw = lmdb_io.array_to_datum(bgr)
    np.testing.assert_array_equal(make(force_gray=True).decode(raw), bgr)  # raw records are not converted


def test_mean_file_found_next_to_the_net(tmp_path, monkeypatch):
    mean_file.write_mean_file(str(tmp_path / "m.binaryproto"), np.ones((1, 2, 2), np.float32))
    monkeypatch.chdir(os.path.dirname(tmp_path))
    t = make(base_dir=str(tmp_path), mean_file="m.binaryproto")
    out = t.transform(np.full((1, 1, 2, 2), 3, np.uint8))
    np.testing.assert_array_equal(out, np.full((1, 1, 2, 2), 2, np.float32))
