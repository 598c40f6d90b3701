"""Blob: pycaffe's shape accessors and numpy views."""
import numpy as np
import pytest

from mpicaffe.backends.engine.blob import Blob


def test_legacy_dims_pad_missing_axes_at_the_end_like_caffe():
    b = Blob((5,))
    assert (b.num, b.channels, b.height, b.width) == (5, 1, 1, 1)
    b = Blob((2, 3, 4, 5))
    assert (b.num, b.channels, b.height, b.width) == (2, 3, 4, 5)
    with pytest.raises(ValueError):
        _ = Blob((1, 2, 3, 4, 5)).num


def test_data_is_a_writable_view_and_reshape_resets():
    b = Blob((2, 3))
    b.data[...] = 7
    assert float(b.tensor.sum()) == 42
    b.diff[...] = 1
    assert b.diff.sum() == 6
    b.reshape(4, 1)
    assert b.shape == (4, 1) and b.count == 4 and not b.data.any()
    np.testing.assert_array_equal(b.diff, np.zeros((4, 1)))
