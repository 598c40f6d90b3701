"""`mpicaffe convert` and its sources: image lists, numpy arrays, built-in datasets."""
import argparse
import io
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from mpicaffe.data import convert, datasets, lmdb_io, mean_file
from mpicaffe.errors import UserError


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def convert_log():
    """Messages logged by the convert module (a handler of its own: the CLI may stop propagation)."""
    logger = logging.getLogger(convert.__name__)
    handler, level = _Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.messages
    logger.removeHandler(handler)
    logger.setLevel(level)


def run_convert(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="mpicaffe convert")
    convert.add_arguments(parser)
    return convert.run(parser.parse_args([str(a) for a in argv]))


def read_db(db):
    """[(key, array, label, datum)] for every record."""
    out = []
    for key, datum in lmdb_io.iter_datums(str(db)):
        array, label = lmdb_io.decode_datum(datum)
        out.append((key, array, label, datum))
    return out


def caffe_layout(image: Image.Image) -> np.ndarray:
    """Independent reference: (C, H, W), BGR for color, as OpenCV and Caffe hold images."""
    a = np.asarray(image)
    return a[np.newaxis] if a.ndim == 2 else a[:, :, ::-1].transpose(2, 0, 1)


# ---------------------------------------------------------------------------- image lists

@pytest.fixture
def image_folder(tmp_path):
    """A root with gray and color PNGs of different sizes and a list file naming them."""
    rng = np.random.default_rng(7)
    root = tmp_path / "root"
    (root / "cls").mkdir(parents=True)
    files = {
        "cls/gray_a.png": Image.fromarray(rng.integers(0, 256, (5, 6), dtype=np.uint8), "L"),
        "cls/color_b.png": Image.fromarray(rng.integers(0, 256, (7, 9, 3), dtype=np.uint8), "RGB"),
        "color c.png": Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8), "RGB"),
        "gray_d.png": Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L"),
    }
    for name, image in files.items():
        image.save(root / name)
    listing = tmp_path / "list.txt"
    listing.write_text("cls/gray_a.png 0\ncls/color_b.png 1\n\ncolor c.png 2\ngray_d.png 3\n")
    return root, listing, files


def test_image_list_color_with_resize(tmp_path, image_folder):
    root, listing, files = image_folder
    out = tmp_path / "img_lmdb"
    assert run_convert("images", listing, "--root", root, "--out", out,
                       "--resize-height", 4, "--resize-width", 6) == 0
    records = read_db(out)
    assert [r[0] for r in records] == [b"00000000_cls/gray_a.png", b"00000001_cls/color_b.png",
                                       b"00000002_color c.png", b"00000003_gray_d.png"]
    assert [r[2] for r in records] == [0, 1, 2, 3]
    for (_, array, _, datum), name in zip(records, files):
        # Caffe resizes with OpenCV's default INTER_LINEAR; we use Pillow's BILINEAR.
        expected = caffe_layout(files[name].convert("RGB").resize((6, 4), Image.BILINEAR))
        assert array.shape == (3, 4, 6) and not datum.encoded
        assert (datum.channels, datum.height, datum.width) == (3, 4, 6)
        np.testing.assert_array_equal(array, expected)


def test_image_list_gray_without_resize_keeps_sizes(tmp_path, image_folder):
    root, listing, files = image_folder
    out = tmp_path / "gray_lmdb"
    run_convert("images", listing, "--root", root, "--out", out, "--gray")
    for (_, array, _, _), name in zip(read_db(out), files):
        expected = caffe_layout(files[name].convert("L"))
        assert array.shape[0] == 1
        np.testing.assert_array_equal(array, expected)


def test_image_list_encoded_keeps_file_bytes_or_reencodes(tmp_path, image_folder):
    root, listing, files = image_folder
    out = tmp_path / "enc_lmdb"
    run_convert("images", listing, "--root", root, "--out", out, "--encoded", "--gray")
    records = read_db(out)
    # gray PNGs are already what --gray asks for: stored as the file's bytes
    assert records[0][3].encoded and records[0][3].data == (root / "cls/gray_a.png").read_bytes()
    # color PNGs are re-encoded as one-channel PNGs
    assert records[1][3].encoded and records[1][3].data != (root / "cls/color_b.png").read_bytes()
    for (_, array, _, _), name in zip(records, files):
        np.testing.assert_array_equal(array, caffe_layout(files[name].convert("L")))

    resized = tmp_path / "enc_resized_lmdb"
    run_convert("images", listing, "--root", root, "--out", resized, "--encode-type", "png",
                "--resize-height", 3, "--resize-width", 3)
    for (_, array, _, datum), name in zip(read_db(resized), files):
        assert datum.encoded and Image.open(io.BytesIO(datum.data)).format == "PNG"
        np.testing.assert_array_equal(
            array, caffe_layout(files[name].convert("RGB").resize((3, 3), Image.BILINEAR)))


def test_image_list_shuffle_is_seeded(tmp_path, image_folder):
    root, listing, _ = image_folder
    listing.write_text("".join(f"gray_d.png {i}\n" for i in range(12)))
    orders = {}
    for seed in (0, 0, 1):
        out = tmp_path / f"shuf_{seed}_{len(orders)}"
        run_convert("images", listing, "--root", root, "--out", out, "--shuffle", "--seed", seed)
        keys_labels = [(k, lab) for k, _, lab, _ in read_db(out)]
        assert [k for k, _ in keys_labels] == [b"%08d_gray_d.png" % i for i in range(12)]
        orders.setdefault(seed, []).append([lab for _, lab in keys_labels])
    assert orders[0][0] == orders[0][1]
    assert orders[0][0] != orders[1][0]
    assert sorted(orders[0][0]) == list(range(12))


def test_malformed_list_line_names_file_and_line(tmp_path, image_folder):
    root, listing, _ = image_folder
    listing.write_text("cls/gray_a.png 0\ncls/color_b.png 1\ncolor_c.png seven\n")
    with pytest.raises(UserError, match=r"list\.txt:3: expected"):
        run_convert("images", listing, "--root", root, "--out", tmp_path / "db")
    listing.write_text("cls/gray_a.png 0\nno_label_here\n")
    with pytest.raises(UserError, match=r"list\.txt:2: expected"):
        run_convert("images", listing, "--root", root, "--out", tmp_path / "db")
    assert not (tmp_path / "db").exists()


def test_missing_image_names_file_and_line(tmp_path, image_folder):
    root, listing, _ = image_folder
    listing.write_text("cls/gray_a.png 0\n\nmissing.png 1\n")
    with pytest.raises(UserError, match=r"list\.txt:3: image .*missing\.png.* not found"):
        run_convert("images", listing, "--root", root, "--out", tmp_path / "db")


def test_check_size_rejects_unequal_images(tmp_path, image_folder):
    root, listing, _ = image_folder
    with pytest.raises(UserError, match=r"list\.txt:2: .*shape"):
        run_convert("images", listing, "--root", root, "--out", tmp_path / "db", "--check-size")
    assert not (tmp_path / "db").exists()


def test_image_list_mean_and_refusal_to_overwrite(tmp_path, image_folder):
    root, listing, files = image_folder
    out, mean_path = tmp_path / "db", tmp_path / "mean.binaryproto"
    args = ["images", listing, "--root", root, "--out", out, "--resize-height", 4, "--resize-width", 6,
            "--mean", mean_path]
    run_convert(*args)
    stack = np.stack([caffe_layout(im.convert("RGB").resize((6, 4), Image.BILINEAR)) for im in files.values()])
    np.testing.assert_allclose(mean_file.read_mean_file(str(mean_path)), stack.mean(axis=0), rtol=1e-5)
    with pytest.raises(UserError, match=f"{out}.*--overwrite"):
        run_convert(*args)
    assert run_convert(*args, "--overwrite") == 0


def test_resize_needs_both_sizes(tmp_path, image_folder):
    root, listing, _ = image_folder
    with pytest.raises(UserError, match="--resize-height and --resize-width"):
        run_convert("images", listing, "--root", root, "--out", tmp_path / "db", "--resize-height", 4)


# ---------------------------------------------------------------------------- numpy arrays

def test_npz_nhwc_uint8_and_mean(tmp_path):
    rng = np.random.default_rng(8)
    x = rng.integers(0, 256, size=(20, 5, 4, 3), dtype=np.uint8)
    y = rng.integers(0, 10, size=20)
    np.savez(tmp_path / "d.npz", X=x, y=y)
    out, mean_path = tmp_path / "db", tmp_path / "m.binaryproto"
    run_convert("npz", tmp_path / "d.npz", "--out", out, "--layout", "nhwc", "--mean", mean_path)
    records = read_db(out)
    assert [r[0] for r in records] == [b"%08d" % i for i in range(20)]
    nchw = x.transpose(0, 3, 1, 2)
    for i, (_, array, label, datum) in enumerate(records):
        assert datum.data == nchw[i].tobytes() and label == y[i]
    np.testing.assert_allclose(mean_file.read_mean_file(str(mean_path)), nchw.mean(axis=0), rtol=1e-5)


def test_npy_pair_float_and_custom_keys(tmp_path):
    x = np.random.default_rng(9).normal(size=(6, 7, 7))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.arange(6))
    run_convert("npz", tmp_path / "x.npy", "--labels", tmp_path / "y.npy", "--out", tmp_path / "db")
    for i, (_, array, label, datum) in enumerate(read_db(tmp_path / "db")):
        assert array.dtype == np.float32 and array.shape == (1, 7, 7) and len(datum.float_data) == 49
        np.testing.assert_array_equal(array[0], x[i].astype(np.float32))
        assert label == i

    np.savez(tmp_path / "k.npz", images=x, targets=np.arange(6))
    with pytest.raises(UserError, match="--data-key"):
        run_convert("npz", tmp_path / "k.npz", "--out", tmp_path / "db2")
    run_convert("npz", tmp_path / "k.npz", "--out", tmp_path / "db2", "--data-key", "images",
                "--label-key", "targets")
    assert lmdb_io.count(str(tmp_path / "db2")) == 6


def test_npz_label_count_mismatch(tmp_path):
    np.savez(tmp_path / "d.npz", data=np.zeros((4, 2, 2), np.uint8), labels=np.zeros(3))
    with pytest.raises(UserError, match="expected 4 labels"):
        run_convert("npz", tmp_path / "d.npz", "--out", tmp_path / "db")


# ---------------------------------------------------------------------------- built-in datasets

def _builtin_summary(out, name):
    train = read_db(out / f"{name}_train_lmdb")
    test = read_db(out / f"{name}_test_lmdb")
    return train, test


def test_digits_scaled_to_8_bit():
    from sklearn.datasets import load_digits

    pixels, labels = datasets.load_digits()
    raw = load_digits()
    assert pixels.shape == (1797, 1, 8, 8) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels[:, 0], np.round(raw.images * 255 / 16))
    assert pixels.max() == 255
    np.testing.assert_array_equal(labels, raw.target)


@pytest.mark.parametrize("name,n_train,n_test,side,channels", [
    ("digits", 1497, 300, 8, 1), ("mnist", 4000, 1000, 28, 1), ("synth32", 5000, 1000, 32, 3)])
def test_builtin_dataset_counts_shapes_classes_and_mean(tmp_path, name, n_train, n_test, side, channels):
    assert run_convert(name, "--out", tmp_path) == 0
    train, test = _builtin_summary(tmp_path, name)
    assert (len(train), len(test)) == (n_train, n_test)
    for records in (train, test):
        assert records[0][0] == b"00000000" and records[-1][0] == b"%08d" % (len(records) - 1)
        assert {r[1].shape for r in records} == {(channels, side, side)}
        assert {r[1].dtype for r in records} == {np.dtype(np.uint8)}
        assert {r[2] for r in records} == set(range(10))  # every class in both splits
    train_x = np.stack([r[1] for r in train])
    mean = mean_file.read_mean_file(str(tmp_path / f"{name}_mean.binaryproto"))
    np.testing.assert_allclose(mean, train_x.mean(axis=0), rtol=1e-5)
    marker = json.loads((tmp_path / f"{name}_dataset.json").read_text())
    assert marker["train_count"] == n_train and marker["test_count"] == n_test


def test_mnist_train_is_shuffled_not_sorted(tmp_path):
    run_convert("mnist", "--out", tmp_path)
    labels = [r[2] for r in read_db(tmp_path / "mnist_train_lmdb")[:100]]
    assert len(set(labels)) > 5


def test_builtin_split_is_deterministic_per_seed(tmp_path):
    runs = {}
    for tag, seed in (("a", 0), ("b", 0), ("c", 3)):
        run_convert("digits", "--out", tmp_path / tag, "--seed", seed)
        train, test = _builtin_summary(tmp_path / tag, "digits")
        runs[tag] = (np.stack([r[1] for r in train]), [r[2] for r in test])
    np.testing.assert_array_equal(runs["a"][0], runs["b"][0])
    assert runs["a"][1] == runs["b"][1]
    assert not np.array_equal(runs["a"][0], runs["c"][0])


def test_builtin_test_fraction_flag(tmp_path):
    run_convert("digits", "--out", tmp_path, "--test-fraction", "0.5")
    assert lmdb_io.count(str(tmp_path / "digits_test_lmdb")) == 898  # round(1797 * 0.5)
    assert lmdb_io.count(str(tmp_path / "digits_train_lmdb")) == 899
    with pytest.raises(UserError, match="--test-fraction"):
        run_convert("digits", "--out", tmp_path / "x", "--test-fraction", "1.5")


def test_builtin_rerun_reuses_and_other_params_are_refused(tmp_path, convert_log):
    run_convert("digits", "--out", tmp_path)
    data_file = tmp_path / "digits_train_lmdb" / "data.mdb"
    stamp = os.stat(data_file).st_mtime_ns
    convert_log.clear()
    assert run_convert("digits", "--out", tmp_path) == 0
    assert any(m.startswith("Reusing digits dataset") for m in convert_log)
    assert os.stat(data_file).st_mtime_ns == stamp

    with pytest.raises(UserError, match="other parameters.*--overwrite"):
        run_convert("digits", "--out", tmp_path, "--seed", 1)
    assert run_convert("digits", "--out", tmp_path, "--seed", 1, "--overwrite") == 0
    assert json.loads((tmp_path / "digits_dataset.json").read_text())["seed"] == 1


def test_builtin_refuses_outputs_it_did_not_write(tmp_path):
    (tmp_path / "digits_train_lmdb").mkdir()
    with pytest.raises(UserError, match="digits_train_lmdb already exists"):
        run_convert("digits", "--out", tmp_path)


# ---------------------------------------------------------------------------- progress

class _FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_counter_on_a_terminal():
    stream = _FakeTTY()
    progress = convert.Progress("Writing db", 100, stream)
    progress(1)
    assert stream.getvalue() == ""  # short jobs stay quiet
    progress._start -= 5
    progress(50)
    progress(100)
    assert stream.getvalue() == "\rWriting db: 50/100\rWriting db: 100/100\n"


def test_progress_logs_every_tenth_when_not_a_terminal(convert_log):
    progress = convert.Progress("Writing db", 100, io.StringIO())
    progress._start -= 5
    for i in range(1, 101):
        progress(i)
    lines = list(convert_log)
    assert len(lines) == 10 and lines[0] == "Writing db: 10/100 (10%)" and lines[-1].endswith("100/100 (100%)")


def test_builtin_rebuilds_its_own_incomplete_output(tmp_path):
    import shutil

    run_convert("digits", "--out", tmp_path)
    shutil.rmtree(tmp_path / "digits_test_lmdb")
    assert run_convert("digits", "--out", tmp_path) == 0
    assert lmdb_io.count(str(tmp_path / "digits_test_lmdb")) == 300
