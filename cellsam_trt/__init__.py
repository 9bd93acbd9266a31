"""cellsam-trt: a fast, faithful inference engine for CellSAM.

    from cellsam_trt import CellSAM
    model = CellSAM.load("cellsam-onnx/")
    res = model.segment(image)

Importing the package loads nothing heavy: the names below are imported on first use.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "CellSAM": "api",
    "LoadError": "api",
    "PromptView": "api",
    "Channels": "pipeline",
    "Prompts": "pipeline",
    "Segmentation": "pipeline",
    "SegmentSettings": "pipeline",
    "ItemResult": "scheduler",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
