"""rsq: Rotate, Scale, then Quantize — low-bit post-training quantization of LLMs."""

__version__ = "0.1.0"
