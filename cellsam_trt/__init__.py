"""cellsam-trt: a fast, faithful inference engine for CellSAM.

Nothing heavy is imported here: ``cellsam_trt.pipeline`` (the stages), ``cellsam_trt.engine``
(backends), ``cellsam_trt.model`` (PyTorch modules and checkpoints), ``cellsam_trt.export``.
"""

__version__ = "0.1.0"
