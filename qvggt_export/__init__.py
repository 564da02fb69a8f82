"""qvggt-export: QVGGT W4A16 quantization, ONNX export and TensorRT engines for VGGT."""

__version__ = "0.1.0"
