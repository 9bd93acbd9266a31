"""Export of the three networks to ONNX and TensorRT engines."""
