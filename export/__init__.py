"""Offline export: checkpoint -> ONNX graphs / engines, and the tiny random-weight test checkpoints."""
