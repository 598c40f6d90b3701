"""Images as Caffe holds them: uint8 arrays of shape (C, H, W) in OpenCV's channel order.

Caffe reads images with OpenCV, so a color image is stored BGR (not RGB) and a gray one has a
single channel; CVMatToDatum then writes the pixels channel-major. These helpers reproduce that
layout with Pillow so that databases written here match those written by convert_imageset.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

# OpenCV's cv::resize defaults to INTER_LINEAR; Pillow's closest filter is BILINEAR. They agree
# when enlarging; when shrinking, Pillow widens the filter (antialiasing) while OpenCV samples only
# the 2x2 neighbours, so downscaled pixels can differ slightly from Caffe's.
RESIZE_FILTER = Image.BILINEAR

# Pillow's format names for the encodings convert_imageset accepts as --encode_type.
ENCODE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG"}

# cv::imencode writes JPEG at quality 95 unless told otherwise; Pillow's default is 75.
JPEG_QUALITY = 95

_GRAY_MODES = ("L", "1", "I", "I;16", "F", "LA", "La")


def image_to_array(image: Image.Image, color: bool | None = None) -> np.ndarray:
    """Convert a Pillow image to a (C, H, W) uint8 array in Caffe's layout.

    color=True gives 3 channels BGR (cv::IMREAD_COLOR), color=False 1 channel (IMREAD_GRAYSCALE,
    same luma weights 0.299/0.587/0.114), color=None keeps what the file holds, as Caffe's
    DecodeDatumNative does (cv::IMREAD_ANYCOLOR): gray stays 1 channel, anything else, an image
    with an alpha channel included, becomes 3 channels BGR.
    """
    if color is None:
        color = image.mode not in _GRAY_MODES
    if not color:
        return np.asarray(image.convert("L"))[np.newaxis].copy()
    rgb = np.asarray(image.convert("RGB"))
    return np.ascontiguousarray(rgb[:, :, ::-1].transpose(2, 0, 1))


def array_to_image(array: np.ndarray) -> Image.Image:
    """Convert a (C, H, W) uint8 array in Caffe's layout (gray, BGR or BGRA) to a Pillow image."""
    channels = array.shape[0]
    if channels == 1:
        return Image.fromarray(np.ascontiguousarray(array[0]), mode="L")
    if channels == 3:
        return Image.fromarray(np.ascontiguousarray(array[::-1].transpose(1, 2, 0)), mode="RGB")
    if channels == 4:
        rgba = array[[2, 1, 0, 3]].transpose(1, 2, 0)
        return Image.fromarray(np.ascontiguousarray(rgba), mode="RGBA")
    raise ValueError(f"cannot make an image of {channels} channels (expected 1, 3 or 4)")


def load_image(path: str, color: bool = True, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read an image file as convert_imageset does: (C, H, W) uint8, BGR or gray.

    size=(height, width) resizes with RESIZE_FILTER after the color conversion, as Caffe's
    ReadImageToCVMat does. Raises OSError if the file is missing or is not an image Pillow reads.
    """
    with Image.open(path) as image:
        image.load()
        image = image.convert("RGB" if color else "L")
    if size is not None:
        height, width = size
        if image.size != (width, height):
            image = image.resize((width, height), RESIZE_FILTER)
    return image_to_array(image, color)


def image_info(path: str) -> tuple[bool, tuple[int, int]]:
    """(whether the file holds color, (height, width)), read from the header only."""
    with Image.open(path) as image:
        return image.mode not in _GRAY_MODES, (image.height, image.width)


def decode_image(data: bytes) -> np.ndarray:
    """Decode PNG/JPEG/... bytes to a (C, H, W) uint8 array with the channels the image holds."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image_to_array(image, None)


def encode_image(array: np.ndarray, encoding: str) -> bytes:
    """Encode a (C, H, W) uint8 array in Caffe's layout as 'png' or 'jpg' bytes."""
    fmt = ENCODE_FORMATS.get(encoding.lower())
    if fmt is None:
        raise ValueError(f"unsupported encoding {encoding!r}; choose one of png, jpg")
    out = io.BytesIO()
    image = array_to_image(array)
    if fmt == "JPEG":
        if image.mode == "RGBA":
            image = image.convert("RGB")
        image.save(out, format=fmt, quality=JPEG_QUALITY)
    else:
        image.save(out, format=fmt)
    return out.getvalue()


def file_encoding(path: str) -> str:
    """The encoding a file name implies, lower case without the dot ('png', 'jpg', ...), or ''."""
    dot = path.rfind(".")
    if dot < 0 or "/" in path[dot:]:
        return ""
    ext = path[dot + 1:].lower()
    return "jpg" if ext == "jpeg" else ext
