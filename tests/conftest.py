"""Shared fixtures: tiny random models of each family and a tiny tokenizer trained on wikitext."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rsq.calib.datasets import find_wikitext_files, read_text

TINY = {
    # hidden 64 = 4·16, intermediate 96 = 12·8 (non-power-of-2 online Hadamard), GQA 4/2
    "llama": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    # Qwen2: q/k/v bias, hidden 56 = 28·2, 7 heads (no Hadamard of order 7: cross-head skipped)
    "qwen2": dict(
        model_type="qwen2",
        hidden_size=56,
        intermediate_size=152,
        num_attention_heads=7,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    ),
    # Mistral: head_dim 32 != hidden/heads = 16
    "mistral": dict(
        model_type="mistral",
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        tie_word_embeddings=False,
    ),
}


def tiny_config(family: str, vocab_size: int = 512, layers: int = 2):
    from transformers import AutoConfig

    spec = dict(TINY[family])
    model_type = spec.pop("model_type")
    return AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        num_hidden_layers=layers,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        **spec,
    )


def tiny_model(family: str, dtype=torch.float32, seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, **kw)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    model.requires_grad_(False)
    # non-trivial norm scales so that fusing them is actually tested
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data = 1 + 0.3 * torch.randn_like(p)
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A 512-token BPE tokenizer trained on the first 300 kB of wikitext (fast, offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    _, test = find_wikitext_files()
    assert test is not None, "tests need ../shared/data/wikitext-2-raw/wiki.test.raw (or RSQ_DATA_DIR)"
    text = read_text(test)[:300_000]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")
    out = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir):
    """Factory: family -> directory with a saved tiny model and the tiny tokenizer."""
    from transformers import AutoTokenizer

    made: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in made:
            out = tmp_path_factory.mktemp(f"tiny-{family}")
            tiny_model(family).save_pretrained(out)
            AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(out)
            made[family] = out
        return made[family]

    return make
