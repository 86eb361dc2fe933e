"""The contract between the parts: gRPC `Inference`, the MQTT fleet messages, and the MQTT topic scheme.

Generated modules (`fleet_pb2`, `inference_pb2`, `inference_pb2_grpc`) are committed; `make protos` regenerates them.
"""
