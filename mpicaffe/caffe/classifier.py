"""pycaffe's `caffe.Classifier`: a TEST net that classifies (H, W, K) images."""
from __future__ import annotations

import numpy as np

from mpicaffe.caffe import io
from mpicaffe.caffe.net import Net
from mpicaffe.proto import caffe_pb2


def configured_transformer(net: Net, mean=None, input_scale=None, raw_scale=None,
                           channel_swap=None) -> io.Transformer:
    """A Transformer for the net's first input: (H, W, K) images to (K, H, W), then the given
    channel swap, raw scale, mean and input scale (what Classifier and Detector set up)."""
    name = net.inputs[0]
    transformer = io.Transformer({name: net.blobs[name].data.shape})
    transformer.set_transpose(name, (2, 0, 1))
    if mean is not None:
        transformer.set_mean(name, mean)
    if input_scale is not None:
        transformer.set_input_scale(name, input_scale)
    if raw_scale is not None:
        transformer.set_raw_scale(name, raw_scale)
    if channel_swap is not None:
        transformer.set_channel_swap(name, channel_swap)
    return transformer


class Classifier(Net):
    """A TEST net with trained weights that predicts class probabilities of images.

    Classifier(model_file, pretrained_file, image_dims=None, mean=None, input_scale=None,
    raw_scale=None, channel_swap=None): images are resized to `image_dims` (default: the net's
    input size), then cropped (center, or ten crops with `oversample`) to the input size and
    preprocessed by `self.transformer`.
    """

    def __init__(self, model_file: str, pretrained_file: str, image_dims=None, mean=None,
                 input_scale=None, raw_scale=None, channel_swap=None):
        super().__init__(model_file, caffe_pb2.TEST, weights=pretrained_file)
        self.transformer = configured_transformer(self, mean, input_scale, raw_scale, channel_swap)
        self.crop_dims = np.array(self.blobs[self.inputs[0]].data.shape[2:])
        self.image_dims = self.crop_dims if image_dims is None or len(image_dims) == 0 else image_dims

    def predict(self, inputs, oversample: bool = True) -> np.ndarray:
        """(N, classes) probabilities of N (H, W, K) images: the mean over the ten crops of each
        (corners, center and their mirrors) with `oversample`, else of the center crop."""
        dims = (int(self.image_dims[0]), int(self.image_dims[1]))
        images = np.zeros((len(inputs),) + dims + (inputs[0].shape[2],), dtype=np.float32)
        for i, image in enumerate(inputs):
            images[i] = io.resize_image(image, dims)
        if oversample:
            images = io.oversample(images, self.crop_dims)
        else:
            # pycaffe's center crop: center ± half the crop, truncated to whole pixels
            center = np.array(dims) / 2.0
            box = np.concatenate([center - self.crop_dims / 2.0, center + self.crop_dims / 2.0]).astype(int)
            images = images[:, box[0]:box[2], box[1]:box[3], :]
        name = self.inputs[0]
        batch = np.stack([self.transformer.preprocess(name, image) for image in images])
        predictions = self.forward_all(**{name: batch})[self.outputs[0]]
        if oversample:
            predictions = predictions.reshape((len(predictions) // 10, 10, -1)).mean(1)
        return predictions
