"""Generated protobuf and gRPC stubs for package moe.v1. DO NOT EDIT.

Regenerate with `python proto/generate.py` after changing proto/moe/v1/*.proto.
"""
