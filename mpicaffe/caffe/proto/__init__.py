"""`mpicaffe.caffe.proto.caffe_pb2`, where pycaffe scripts find `caffe.proto.caffe_pb2`."""
from mpicaffe.proto import caffe_pb2

__all__ = ["caffe_pb2"]
