"""pycaffe's `caffe.draw`: the implementation is mpicaffe.draw, which imports no torch, so that
`mpicaffe draw` starts fast."""
from mpicaffe.draw import *
from mpicaffe.draw import __all__  # noqa: F401
