"""Generated gRPC/protobuf code for protos/facefuse/v1 (``make protos``); do not edit by hand."""
