"""The contracts between processes (protobuf package moe; generated stubs under moe.v1)."""
