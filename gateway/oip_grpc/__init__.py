"""Code generated from the Open Inference Protocol's gRPC definition (see generate.sh); not edited by hand."""
