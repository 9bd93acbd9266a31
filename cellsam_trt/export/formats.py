"""The ONNX flavour every exported graph is written in, and the node names it gives layers."""

OPSET = 17
IR_VERSION = 10  # onnx 1.23 writes IR 14, which onnxruntime 1.31 rejects
# INT8 scopes of every INT8 path: "mlp" = the two MLP MatMuls of each ViT block (image encoder,
# CellFinder's backbone), matched by MLP_NODES; "all" = each path's wider set of layers
INT8_SCOPES = ("mlp", "all")
MLP_NODES = r"/mlp/lin[12]/"
