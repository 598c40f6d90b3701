"""pycaffe's `caffe.Detector`: classify windows cropped from images (R-CNN style)."""
from __future__ import annotations

import numpy as np

from mpicaffe.caffe import io
from mpicaffe.caffe.classifier import configured_transformer
from mpicaffe.caffe.net import Net
from mpicaffe.proto import caffe_pb2


class Detector(Net):
    """A TEST net with trained weights that classifies windows of images.

    Detector(model_file, pretrained_file, mean=None, input_scale=None, raw_scale=None,
    channel_swap=None, context_pad=None): each window (ymin, xmin, ymax, xmax) is cropped, with
    `context_pad` pixels of surrounding context in the net's input as R-CNN does, warped to the
    input size and preprocessed by `self.transformer`.
    """

    def __init__(self, model_file: str, pretrained_file: str, mean=None, input_scale=None,
                 raw_scale=None, channel_swap=None, context_pad=None):
        super().__init__(model_file, caffe_pb2.TEST, weights=pretrained_file)
        self.transformer = configured_transformer(self, mean, input_scale, raw_scale, channel_swap)
        self.configure_crop(context_pad)

    def detect_windows(self, images_windows) -> list[dict]:
        """Classify the windows of each (image filename, windows) pair: a list of
        {'window', 'prediction', 'filename'} dicts, in input order."""
        images_windows = [(name, list(windows)) for name, windows in images_windows]
        crops = []
        for filename, windows in images_windows:
            image = io.load_image(filename).astype(np.float32)
            crops.extend(self.crop(image, window) for window in windows)
        name = self.inputs[0]
        batch = np.zeros((len(crops), crops[0].shape[2]) + self.blobs[name].data.shape[2:], dtype=np.float32)
        for i, crop in enumerate(crops):
            batch[i] = self.transformer.preprocess(name, crop)
        predictions = self.forward_all(**{name: batch})[self.outputs[0]]
        detections, i = [], 0
        for filename, windows in images_windows:
            for window in windows:
                detections.append({"window": window, "prediction": predictions[i], "filename": filename})
                i += 1
        return detections

    def detect_selective_search(self, image_fnames) -> list[dict]:
        """Not available: pycaffe's version runs the external MATLAB selective search package
        (selective_search_ijcv_with_python); compute windows yourself and call detect_windows."""
        raise NotImplementedError("detect_selective_search needs the MATLAB-based selective_search_ijcv_with_python "
                                  "package, which mpicaffe does not ship: compute the windows and call "
                                  "detect_windows([(filename, windows), ...])")

    def crop(self, im: np.ndarray, window) -> np.ndarray:
        """The window (ymin, xmin, ymax, xmax) of an (H, W, K) image; with context_pad, the
        window grown so that context_pad input pixels around it are context, out-of-image parts
        filled with the mean (as pycaffe's Detector.crop)."""
        window = np.asarray(window)
        crop = im[window[0]:window[2], window[1]:window[3]]
        if not self.context_pad:
            return crop
        size = self.blobs[self.inputs[0]].width  # square inputs, as pycaffe assumes
        scale = size / (1.0 * size - self.context_pad * 2)
        half_h = (window[2] - window[0] + 1) / 2.0
        half_w = (window[3] - window[1] + 1) / 2.0
        center = (window[0] + half_h, window[1] + half_w)
        box = np.round(np.tile(center, 2) + scale * np.array((-half_h, -half_w, half_h, half_w)))
        scale_h = size / (box[2] - box[0] + 1)
        scale_w = size / (box[3] - box[1] + 1)
        pad_y = round(max(0, -box[0]) * scale_h)
        pad_x = round(max(0, -box[1]) * scale_w)
        im_h, im_w = im.shape[:2]
        box = np.clip(box, 0.0, [im_h, im_w, im_h, im_w])
        clip_h, clip_w = box[2] - box[0] + 1, box[3] - box[1] + 1
        if clip_h <= 0 or clip_w <= 0:
            raise ValueError(f"window {window.tolist()} lies outside the {im_h}x{im_w} image")
        crop_h = min(round(clip_h * scale_h), size - pad_y)
        crop_w = min(round(clip_w * scale_w), size - pad_x)
        box = box.astype(int)
        context = io.resize_image(im[box[0]:box[2], box[1]:box[3]], (crop_h, crop_w))
        out = np.ones(self.crop_dims, dtype=np.float32) * self.crop_mean
        out[pad_y:pad_y + crop_h, pad_x:pad_x + crop_w] = context
        return out

    def configure_crop(self, context_pad) -> None:
        """Set the crop size (the net's input, as (H, W, K)) and context padding; with padding,
        `crop_mean` is the mean in image space (before channel swap and raw scale), which fills
        out-of-image context."""
        name = self.inputs[0]
        transpose = self.transformer.transpose[name]
        inverse = [transpose[t] for t in transpose]
        self.crop_dims = np.array(self.blobs[name].data.shape[1:])[inverse]
        self.context_pad = context_pad
        if not context_pad:
            return
        mean = self.transformer.mean.get(name)
        if mean is None:
            self.crop_mean = np.zeros(self.crop_dims, dtype=np.float32)
            return
        crop_mean = mean.copy().transpose(inverse)
        channel_swap = self.transformer.channel_swap.get(name)
        if channel_swap is not None:
            order = list(channel_swap)
            crop_mean = crop_mean[:, :, [order.index(i) for i in range(crop_mean.shape[2])]]
        raw_scale = self.transformer.raw_scale.get(name)
        if raw_scale is not None:
            crop_mean = crop_mean / raw_scale
        self.crop_mean = crop_mean
