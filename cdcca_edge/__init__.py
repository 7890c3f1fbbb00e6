"""cdcca-edge: cloud-device collaborative adaptation of (multimodal) LLMs.

Subpackages: ``core`` (formats shared by device and cloud), ``runtime`` (the on-device
backends), ``converters`` (HF -> GGUF/ONNX), ``cloud`` (training side), ``cli``.
"""

__version__ = "0.1.0"
