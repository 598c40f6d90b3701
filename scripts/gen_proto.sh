#!/usr/bin/env bash
# Rebuild mpicaffe/proto/caffe_pb2.py from mpicaffe/proto/caffe.proto.
#
# Needs grpcio-tools (`pip install grpcio-tools`), which bundles protoc. protoc runs
# from the repository root with `-I .` so that the descriptor's file name is
# "mpicaffe/proto/caffe.proto", which tests/test_proto_schema.py checks.
# The generated module embeds the protoc version and refuses to load under an
# older protobuf runtime, so keep pyproject's protobuf floor in step with it.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m grpc_tools.protoc -I . --python_out=. mpicaffe/proto/caffe.proto
grep -m1 '^# Protobuf Python Version:' mpicaffe/proto/caffe_pb2.py
