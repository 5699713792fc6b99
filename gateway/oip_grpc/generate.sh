#!/bin/sh
# Regenerates gateway/oip_grpc/open_inference_grpc_pb2{,_grpc}.py from the Open Inference Protocol's
# official gRPC definition: kserve/open-inference-protocol, specification/protocol/open_inference_grpc.proto
# (generated from commit eeb043e2c95c1dd35f8b9185f5dadf44c7f10c9f). The .proto is not kept in this repository.
#
#   sh gateway/oip_grpc/generate.sh PATH/TO/open_inference_grpc.proto
#
# grpcio-tools < 1.76 makes code for the protobuf 6 runtime (tritonclient[grpc] pins protobuf < 7).
# The proto is placed under ringserve/gateway/oip_grpc/ so that the generated stub imports its
# messages as ringserve.gateway.oip_grpc.open_inference_grpc_pb2 (a package import, not a top-level one).
set -eu
proto=${1:?usage: generate.sh PATH/TO/open_inference_grpc.proto}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/in/ringserve/gateway/oip_grpc" "$work/out"
cp "$proto" "$work/in/ringserve/gateway/oip_grpc/open_inference_grpc.proto"
python -m grpc_tools.protoc -I "$work/in" --python_out="$work/out" --grpc_python_out="$work/out" \
    ringserve/gateway/oip_grpc/open_inference_grpc.proto
cp "$work/out/ringserve/gateway/oip_grpc/open_inference_grpc_pb2.py" \
   "$work/out/ringserve/gateway/oip_grpc/open_inference_grpc_pb2_grpc.py" "$here/"
