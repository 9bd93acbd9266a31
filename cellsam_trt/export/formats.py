"""The ONNX flavour every exported graph is written in, and the node names it gives layers."""

OPSET = 17
IR_VERSION = 10  # onnx 1.23 writes IR 14, which onnxruntime 1.31 rejects
# the two MLP MatMuls of a ViT block (image encoder, CellFinder's backbone): INT8's default scope
MLP_NODES = r"/mlp/lin[12]/"
