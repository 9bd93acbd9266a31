"""The ONNX flavour every exported graph is written in."""

OPSET = 17
IR_VERSION = 10  # onnx 1.23 writes IR 14, which onnxruntime 1.31 rejects
