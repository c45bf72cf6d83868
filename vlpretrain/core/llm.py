"""HF causal-LM helpers: build a LLaMA from a small typed spec, count its parameters and FLOPs.

Real runs load a local LLaMA folder (``LlamaForCausalLM.from_pretrained(path)``); tiny presets are built here from a
config so that tests and the demo need no download. Input and output embeddings are untied, as in LaVIT.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

from vlpretrain.configs import check_at_least, check_divides


@dataclass
class LlamaSpec:
    """Size of a LLaMA decoder built from scratch (ignored when ``path`` names a local HF folder).

    Args:
        path: a local HF LLaMA folder to load instead of building from the sizes below ("" = build).
        hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads: the decoder's dimensions.
        max_positions: the longest sequence (RoPE table size).
        rope_theta: RoPE base.
        rms_norm_eps: epsilon of the RMSNorms (1e-6; LLaMA-2's folders say 1e-5).
    """

    path: str = ""
    hidden_size: int = 64
    intermediate_size: int = 172
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    max_positions: int = 256
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        sizes = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "max_positions")
        check_at_least(self, 1, sizes, prefix="llm.")
        check_divides(self.num_heads, self.hidden_size, "llm.num_heads", "hidden_size")
        check_divides(self.num_kv_heads, self.num_heads, "llm.num_kv_heads", "num_heads")


def build_llama(spec: LlamaSpec, vocab_size: int) -> LlamaForCausalLM:
    """A LlamaForCausalLM from ``spec``: loaded from ``spec.path`` (vocabulary resized) or built at random."""
    if spec.path:
        path = Path(spec.path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"llm.path: {path} is not an HF model folder (no config.json)")
        model = LlamaForCausalLM.from_pretrained(str(path), local_files_only=True)
        if model.get_input_embeddings().num_embeddings != vocab_size:
            model.resize_token_embeddings(vocab_size)
        return model
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_positions,
        rope_theta=spec.rope_theta,
        rms_norm_eps=spec.rms_norm_eps,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def non_embedding_params(model: LlamaForCausalLM) -> int:
    """Parameters outside the input embedding table (the usual N in the 6N FLOPs rule)."""
    emb = model.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - emb
