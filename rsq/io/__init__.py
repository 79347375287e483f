"""Reading models: loading.py (hub id, HF directory, GGUF, the embedded default), streaming.py
(layer by layer from safetensors), hf.py (the transformers quantizer integration), hub.py (push)."""
