"""The runtime core: what every backend, the pipeline and ``cellsam-trt run`` share, on NumPy alone.

``specs`` (one declarative spec per exported graph), ``prompt_layout`` (how box and point prompts
become decoder-graph inputs), ``manifest`` (the export directory's manifest), ``engine_file``
(the TensorRT engine container and its header). Nothing here imports torch, onnx or a backend.
"""
