"""cellsam-trt: a fast, faithful inference engine for CellSAM."""

from setuptools import find_packages, setup

setup(
    name="cellsam-trt",
    version="0.1.0",
    description="Fast, faithful CellSAM inference: PyTorch reference, ONNX Runtime, TensorRT",
    packages=find_packages(include=["cellsam_trt", "cellsam_trt.*"]),
    python_requires=">=3.10",
    # the runtime (ONNX Runtime / TensorRT backends, pre/post-processing) needs no torch
    install_requires=[
        "numpy>=1.24",
        "scipy>=1.10",
        "scikit-image>=0.21",
        "tifffile>=2023.1",
        "imageio>=2.30",
        "tqdm>=4.60",
    ],
    extras_require={
        # torch: install the build for your machine first (CPU CI: `pip install torch==2.13.0`)
        "export": ["torch>=2.1", "segment-anything>=1.0", "onnx>=1.15"],
        "ort": ["onnxruntime>=1.17"],
        "trt": ["tensorrt>=10.0", "cuda-python>=12.0"],
        "parquet": ["pyarrow>=12"],
        "dev": ["pytest>=7", "scikit-learn>=1.3", "hypothesis>=6", "pyarrow>=12"],
    },
    entry_points={"console_scripts": ["cellsam-trt=cellsam_trt.cli:main"]},
)
