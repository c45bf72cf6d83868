"""The config of Libra's LM stages (``libra-pretrain`` = stage 1, ``libra-instruct`` = stage 2).

Where the language model comes from, in order: ``init`` (a Libra checkpoint: stage 2 starts from stage 1; its
architecture and tokenizers are used), ``text_lm`` (a ``text-lm`` run: its trained LLaMA and text tokenizer; the
demo), ``llm.path`` (a local HF LLaMA folder: real runs), else a random LLaMA of ``llm``'s sizes (tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vlpretrain.configs import ConfigError, check_at_least
from vlpretrain.core.llm import LlamaSpec
from vlpretrain.libra.model import EXPERT_INITS
from vlpretrain.libra.visual_codes import VisualCodesConfig


@dataclass
class LibraConfig:
    """Libra's routed LM and its training data format.

    Args:
        llm: the LLaMA's sizes (or ``llm.path``, a local HF folder); replaced by the actual sizes once built.
        text_lm: a ``text-lm`` run or checkpoint folder whose LLaMA and tokenizer the model starts from.
        init: a ``libra-pretrain``/``libra-instruct`` checkpoint to start from (its architecture, tokenizers and
            weights; ``llm``, ``text_tokenizer``, ``tokenizer``, ``codes``, ``down_ratio`` and ``bridge_rank`` are
            taken from it).
        text_tokenizer: "shapes-world-libra" (built in) or a local HF tokenizer folder; "" = the text LM's
            (``text_lm``), else "shapes-world-libra".
        tokenizer: a ``libra-tokenizer`` folder (the frozen encoder + quantiser); "" = a random one from ``codes``
            (tests only).
        codes: the random tokenizer's config (ignored when ``tokenizer`` is given).
        text_vocab: T, rows of the LLaMA's text embedding (0 = the text tokenizer's size); recorded once built.
        down_ratio: rank of the visual experts = output size / down_ratio (official 4).
        bridge_rank: rank of the four key/value bridges per layer (official 8; 0 = no bridge).
        expert_init: how the visual experts start: "random" (official) or "lm" (truncated SVD of the text layer's
            weights, norms copied; ours, see docs/libra.md). Only read when the model is built without ``init``.
        max_len: positions per training row (text beyond it is cut; the image must fit).
        train_lm: train the LLaMA too (stage 2); False freezes every ``model.lm.*`` weight (stage 1).
        visual_loss_weight: weight of the image-code targets in the loss (official 1.0).
        caption_round_prob: stage 2: probability that a conversation also asks for the caption (first round).
    """

    llm: LlamaSpec = field(default_factory=lambda: LlamaSpec(hidden_size=64, intermediate_size=128))
    text_lm: str = ""
    init: str = ""
    text_tokenizer: str = ""
    tokenizer: str = ""
    codes: VisualCodesConfig = field(default_factory=VisualCodesConfig)
    text_vocab: int = 0
    down_ratio: int = 4
    bridge_rank: int = 8
    expert_init: str = "random"
    max_len: int = 128
    train_lm: bool = False
    visual_loss_weight: float = 1.0
    caption_round_prob: float = 0.0

    def __post_init__(self) -> None:
        if self.init and self.text_lm:
            raise ConfigError("init / text_lm: give one (init already holds a trained LLaMA)")
        check_at_least(self, 1, ("down_ratio",))
        check_at_least(self, 0, ("bridge_rank", "text_vocab"))
        if not 8 <= self.max_len <= self.llm.max_positions:
            raise ConfigError(f"max_len: {self.max_len} must be in 8..llm.max_positions ({self.llm.max_positions})")
        if self.expert_init not in EXPERT_INITS:
            raise ConfigError(f"expert_init: '{self.expert_init}' must be one of {', '.join(EXPERT_INITS)}")
        check_at_least(self, 0, ("visual_loss_weight",))
        if not 0 <= self.caption_round_prob <= 1:
            raise ConfigError(f"caption_round_prob: {self.caption_round_prob} is outside [0, 1]")


__all__ = ["LibraConfig"]
