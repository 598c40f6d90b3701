"""Caffe's log line contents and smoothed loss (mpicaffe.logs)."""
import numpy as np

from mpicaffe.logs import SmoothedLoss, format_float, output_lines


def test_format_float_prints_six_significant_digits_as_cpp_ostream():
    assert format_float(0.1) == "0.1"
    assert format_float(np.float32(2.3025851)) == "2.30259"
    assert format_float(1e-7) == "1e-07"
    assert format_float(123456789) == "1.23457e+08"


def test_output_lines_show_the_weighted_loss_only_for_loss_outputs():
    lines = output_lines("Test", ["accuracy", "loss"], [0.5, 0.25], [0, 2])
    assert lines == ["    Test net output #0: accuracy = 0.5", "    Test net output #1: loss = 0.25 (* 2 = 0.5 loss)"]


def _caffe_smoothed(losses, window):
    """Caffe's Solver::UpdateSmoothedLoss, transcribed: a vector indexed by iteration."""
    kept, smoothed = [], np.float32(0)
    for it, loss in enumerate(np.float32(x) for x in losses):
        if len(kept) < window:
            kept.append(loss)
            smoothed = np.float32((smoothed * np.float32(len(kept) - 1) + loss) / np.float32(len(kept)))
        else:
            idx = it % window
            smoothed = np.float32(smoothed + (loss - kept[idx]) / np.float32(window))
            kept[idx] = loss
    return smoothed


def test_smoothed_loss_is_caffes_running_window_bit_for_bit():
    losses = np.random.default_rng(0).uniform(0, 3, 50).astype(np.float32)
    for window in (1, 3, 7, 50, 80):
        s = SmoothedLoss(window)
        for n in range(1, len(losses) + 1):
            s.add(losses[n - 1])
            assert s.value == _caffe_smoothed(losses[:n], window), (window, n)
    # a window longer than the run is the mean of all, up to float32 rounding
    assert abs(float(s.value) - float(losses[-50:].mean())) < 1e-5
