"""Caffe's protobuf messages under mpicaffe's own package name.

`caffe_pb2` is generated from caffe.proto in this folder (scripts/gen_proto.sh) and
reads and writes the same bytes and prototxt text as BVLC Caffe's module of that name.
"""

from . import caffe_pb2

__all__ = ["caffe_pb2"]
