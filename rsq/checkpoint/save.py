"""Write a quantized model directory (interim: dequantized weights; packed format follows)."""

from __future__ import annotations

from pathlib import Path

from rsq.config import RSQConfig


def save_checkpoint(model, tokenizer, out: Path, cfg: RSQConfig, state, rotation_record) -> None:
    model.config.quantization_config = {
        "quant_method": "rsq-fake",
        "method": cfg.method,
        "bits": cfg.grid.bits,
        "group_size": cfg.grid.group_size,
        "rotation": rotation_record,
        "rsq_config": cfg.to_dict(),
    }
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
