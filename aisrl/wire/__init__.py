"""Conversions between protobuf wire messages and in-memory types (numpy arrays, torch tensors, core types)."""
