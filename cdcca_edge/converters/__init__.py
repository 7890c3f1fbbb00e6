"""HF model (+ PEFT adapter) -> device artefacts (GGUF, ONNX), validated against torch."""
