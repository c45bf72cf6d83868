"""LaVIT's unified language model: a LLaMA that reads images as continuous tokens and writes them as visual codes.

Architecture choices (docs/lm.md):

- the LM is HF ``LlamaForCausalLM`` (a local LLaMA folder, or built from ``LlamaSpec`` sizes) with untied input and
  output embeddings, extended from T text ids to T + 2 + K rows (:class:`~vlpretrain.lavit.vocab.VisualVocab`:
  ``[IMG]`` = T, ``[/IMG]`` = T + 1, code c = T + 2 + c; 48386 rows for LLaMA's 32000 and K = 16384); the new rows
  are drawn like word embeddings, N(0, ``initializer_range``), as the official's (``code_rows_init="normal"``), or,
  ours, from the codebook (``"codebook"``: code rows that start with the codebook's similarity structure, see
  :func:`init_code_rows_from_codebook`; docs/lm.md "A generation-heavy stage 2 and code rows from the codebook");
- the frozen LaVIT tokenizer is held outside the module tree (not trained, not saved; its folder and a digest of its
  weights are recorded): it gives the encoder features and keep masks of understanding images and the code ids of
  generation images;
- the understanding path (``visual.*``, trained at its own learning rate): a copy of the tokenizer's merger
  (``visual.merger``, started from the tokenizer's ``causal_encoder`` and fine-tuned, as the official
  ``visual_weight.bin`` is) run on the kept rows, then ``visual.vit_proj`` Linear(D, H) into the LM's input space.

Shape letters: B images, N patches, K kept tokens (padded), D tokenizer width, H LM width, R packed rows, L row
length, S continuous visual slots, V vocabulary.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM

from vlpretrain.configs import ConfigError
from vlpretrain.core.llm import LlamaSpec, build_llama
from vlpretrain.core.text_tokenizer import load_text_tokenizer
from vlpretrain.core.whiten import Whitening
from vlpretrain.errors import UserError
from vlpretrain.lavit.merger import TokenMerger
from vlpretrain.lavit.tokenizer import DynamicTokenizer
from vlpretrain.lavit.tokenizer_task import load_frozen_tokenizer
from vlpretrain.lavit.vocab import VisualVocab

DIGEST_BYTES = 32
_BUILTIN_TEXT_TOKENIZERS = ("shapes-world", "shapes-world-lm")


@dataclass
class LavitLMConfig:
    """The unified LM and its training mixture.

    Args:
        llm: the decoder (``llm.path`` = a local LLaMA folder; else built from the sizes).
        text_tokenizer: "shapes-world-lm" (built in, for the demo) or a local HF tokenizer folder.
        tokenizer: the frozen ``lavit-tokenizer`` folder ("" = a random ``tokenizer_preset`` one, tests only).
        tokenizer_preset: see ``tokenizer``.
        max_len: L, tokens per packed training row; also the longest context at inference (<= llm.max_positions).
        understand_ratio: fraction of image-text pairs trained as ``[image, text]`` (the rest ``[text, image]``).
        qa_ratio: fraction of ``[image, text]`` samples that are VQA ("Question: q Answer: a") instead of captions.
        qa_turns: questions a VQA sample asks about its image, one after another (``Question: q Answer: a </s>``
            each; 1 = one question per sample, the evaluation's format): the same image tokens then teach several
            answers (ours, for the demo's VQA; docs/lm.md, "Several questions per image").
        text_ratio: text-only documents per image-text pair (2.0 = the maintainers' 2:1).
        caption_drop: probability that a ``[text, image]`` sample loses its text and becomes ``[IMG] codes [/IMG]``,
            the unconditional context of classifier-free guidance (0 = none, as in the paper's data recipe; ours,
            as LlamaGen's caption dropout; tried in docs/lm.md, "More images and cheaper steps").
        train_merger: fine-tune the understanding merger (the official does); False keeps the tokenizer's.
        train_vit_proj: train ``vit_proj`` (the official does); False keeps its random init, a map that preserves the
            merged tokens' geometry: trained, it shrank the colour directions until the demo LM could not read
            colour (docs/lm.md, "Where the colour goes").
        detokenizer: a ``lavit-detokenizer`` folder that turns generated codes into pixels ("" = none).
        visual_keep: which patches become visual tokens, in training and inference: "" = the tokenizer's own
            ``eval_keep`` (the dynamic tokens); "all" = every patch (the fixed-length baseline of the paper's
            dynamic-vs-fixed ablation); "deterministic" / "sample" force that mode.
        whiten_visual: 0 = off (official); s > 0 = damped whitening of the merged tokens before ``vit_proj``, fitted
            on the first training batch (:class:`vlpretrain.core.whiten.Whitening` with shrink s): lifts the
            low-variance directions (colour) that the LM otherwise learns last (docs/lm.md, "Curriculum").
        code_rows_init: how the K code rows of the input and output embeddings start when they are new (built from
            sizes, or a text-only LLaMA folder extended): "normal" = N(0, initializer_range) as word embeddings (the
            official); "codebook" = a fixed random projection of the codebook (ours: similar codes start with
            similar rows; docs/lm.md). A folder that already has the visual rows keeps its own.
        init: a ``lavit-lm`` run or checkpoint folder whose weights start training (the next stage of a curriculum,
            e.g. the demo's understanding-only stage before the mixed one); same sizes and tokenizer required.
            Only training reads it: loading a trained LM takes the weights of its own folder.
    """

    llm: LlamaSpec = field(default_factory=LlamaSpec)
    text_tokenizer: str = "shapes-world-lm"
    tokenizer: str = ""
    tokenizer_preset: str = "tiny"
    max_len: int = 256
    understand_ratio: float = 0.5
    qa_ratio: float = 0.0
    qa_turns: int = 1
    text_ratio: float = 2.0
    caption_drop: float = 0.0
    train_merger: bool = True
    train_vit_proj: bool = True
    detokenizer: str = ""
    visual_keep: Literal["", "deterministic", "sample", "all"] = ""
    whiten_visual: float = 0.0
    code_rows_init: Literal["normal", "codebook"] = "normal"
    init: str = ""

    def __post_init__(self) -> None:
        if self.max_len < 8:
            raise ConfigError(f"max_len: {self.max_len} must be >= 8")
        if not self.llm.path:  # with a folder, the folder's positions are checked when it is read
            check_context_length(self)
        for name in ("understand_ratio", "qa_ratio", "caption_drop"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}: {getattr(self, name)} must be in [0, 1]")
        if self.text_ratio < 0:
            raise ConfigError(f"text_ratio: {self.text_ratio} must be >= 0")
        if self.qa_turns < 1:
            raise ConfigError(f"qa_turns: {self.qa_turns} must be >= 1")
        if self.code_rows_init not in ("normal", "codebook"):
            raise ConfigError(f"code_rows_init: {self.code_rows_init!r} must be 'normal' or 'codebook'")
        if self.whiten_visual < 0:
            raise ConfigError(f"whiten_visual: {self.whiten_visual} must be >= 0 (0 = off)")


def check_context_length(cfg: LavitLMConfig) -> None:
    """ConfigError when ``max_len`` exceeds the LLaMA's positions."""
    if cfg.max_len > cfg.llm.max_positions:
        raise ConfigError(f"max_len: {cfg.max_len} exceeds llm.max_positions ({cfg.llm.max_positions})")


@functools.lru_cache(maxsize=4)
def _builtin_text_tokenizer(spec: str) -> Any:
    return load_text_tokenizer(spec)


def text_tokenizer_for(spec: str) -> Any:
    """The text tokenizer ``spec`` names (built-in ones are trained once per process, then copied)."""
    if not spec:
        raise ConfigError("text_tokenizer: empty; give a local HF tokenizer folder (e.g. LLaMA's) or 'shapes-world-lm'")
    if spec in _BUILTIN_TEXT_TOKENIZERS:
        return copy.deepcopy(_builtin_text_tokenizer(spec))
    return load_text_tokenizer(spec)


def spec_from_hf_config(config: LlamaConfig, path: str = "", where: str = "llm.path") -> LlamaSpec:
    """The :class:`LlamaSpec` of an HF LLaMA config (``path`` kept); settings the builder cannot express (another
    activation, biases, RoPE scaling, another head size) are refused, so that a checkpoint rebuilt from the spec has
    exactly the folder's architecture."""
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": 10000.0, "rope_type": "default"}
    head_dim = config.hidden_size // config.num_attention_heads
    problems = {
        "hidden_act": (config.hidden_act, "silu"),
        "attention_bias": (config.attention_bias, False),
        "mlp_bias": (getattr(config, "mlp_bias", False), False),
        "rope_type": (rope.get("rope_type", "default"), "default"),
        "head_dim": (getattr(config, "head_dim", None) or head_dim, head_dim),
    }
    bad = [f"{k} = {got!r} (supported: {want!r})" for k, (got, want) in problems.items() if got != want]
    if bad:
        raise UserError(f"{where}: not a plain LLaMA: {'; '.join(bad)}")
    return LlamaSpec(path=path, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                     num_layers=config.num_hidden_layers, num_heads=config.num_attention_heads,
                     num_kv_heads=config.num_key_value_heads or config.num_attention_heads,
                     max_positions=config.max_position_embeddings, rope_theta=float(rope["rope_theta"]),
                     rms_norm_eps=config.rms_norm_eps)  # fmt: skip


def build_language_model(spec: LlamaSpec, vocab: VisualVocab, codebook_KC: Tensor | None = None) -> LlamaForCausalLM:
    """The LLaMA with ``vocab.size`` untied embedding rows.

    A folder whose vocabulary is T (text only) is extended; one of T + 2 + K rows (e.g. the official
    ``language_model/``, 48386) is used as it is; any other size is refused. With ``codebook_KC`` [K, C], new code
    rows start from it (:func:`init_code_rows_from_codebook`); a folder's own code rows are kept.
    """
    if not spec.path:
        lm, new_code_rows = build_llama(spec, vocab.size), True
    else:
        folder_config = LlamaConfig.from_pretrained(spec.path, local_files_only=True)
        spec_from_hf_config(folder_config, spec.path)
        rows = folder_config.vocab_size
        if rows not in (vocab.text_size, vocab.size):
            raise UserError(f"llm.path: {spec.path} has {rows} embedding rows; expected the text vocabulary "
                            f"({vocab.text_size}) or text + 2 + codes ({vocab.size})")  # fmt: skip
        lm = build_llama(spec, rows)
        untie_embeddings(lm)
        new_code_rows = rows == vocab.text_size
        if new_code_rows:
            extend_vocabulary(lm, vocab.size)
    if new_code_rows and codebook_KC is not None:
        init_code_rows_from_codebook(lm, vocab, codebook_KC)
    return lm


def untie_embeddings(lm: LlamaForCausalLM) -> None:
    """Give ``lm_head`` its own copy of the input embeddings when they are tied (LaVIT's are separate)."""
    if lm.lm_head.weight is lm.get_input_embeddings().weight:
        lm.lm_head.weight = nn.Parameter(lm.lm_head.weight.detach().clone())
    lm.config.tie_word_embeddings = False


@torch.no_grad()
def extend_vocabulary(lm: LlamaForCausalLM, size: int) -> None:
    """Grow input and output embeddings to ``size`` rows; new rows ~ N(0, initializer_range), as word embeddings."""
    old = lm.get_input_embeddings().num_embeddings
    lm.resize_token_embeddings(size, mean_resizing=False)
    std = lm.config.initializer_range
    lm.get_input_embeddings().weight[old:].normal_(0.0, std)
    lm.get_output_embeddings().weight[old:].normal_(0.0, std)


@torch.no_grad()
def init_code_rows_from_codebook(lm: LlamaForCausalLM, vocab: VisualVocab, codebook_KC: Tensor) -> None:
    """Overwrite the K code rows of the input and output embeddings with projections of the codebook (ours).

    Each code vector is centred (the codebook's mean removed) and scaled to unit norm, then multiplied by a random
    [C, H] matrix of N(0, initializer_range) entries, one matrix per embedding (drawn from the global generator, so
    the training seed fixes it): every row then has the word embeddings' scale, and the rows' inner products follow
    the codes' cosine similarities (up to the projection's noise, about 1/sqrt(H)), so a code the LM has learned to
    predict or read lends a start to its neighbours. Centring removes the direction all codes share.

    Args:
        codebook_KC: the tokenizer's codebook [K, C] (K = ``vocab.codebook_size``).
    """
    if codebook_KC.shape[0] != vocab.codebook_size:
        raise ValueError(f"codebook has {codebook_KC.shape[0]} codes, the vocabulary {vocab.codebook_size}")
    centred_KC = codebook_KC.float() - codebook_KC.float().mean(dim=0)
    unit_KC = F.normalize(centred_KC, dim=1, eps=1e-6)
    std = lm.config.initializer_range
    for table in (lm.get_input_embeddings().weight, lm.get_output_embeddings().weight):
        proj_CH = torch.randn(unit_KC.shape[1], table.shape[1]) * std
        table[vocab.code_offset :] = (unit_KC @ proj_CH).to(table)


class VisualInput(nn.Module):
    """The understanding path: merged kept tokens [B, K, D] -> (optional whitening) -> ``vit_proj`` -> LM inputs
    [B, K, H]."""

    def __init__(self, tokenizer: DynamicTokenizer, hidden: int, whiten_shrink: float = 0.0) -> None:
        super().__init__()
        tcfg, dim = tokenizer.cfg, tokenizer.encoder.dim
        self.merger = TokenMerger(dim, tcfg.merger_depth, tcfg.heads, int(dim * tcfg.mlp_ratio))
        self.merger.load_state_dict(tokenizer.causal_encoder.state_dict())
        self.whiten = Whitening(dim, whiten_shrink) if whiten_shrink > 0 else None
        self.vit_proj = nn.Linear(dim, hidden)
        # Projected tokens start at the word embeddings' scale (std 0.02 for unit-variance merged tokens).
        nn.init.normal_(self.vit_proj.weight, std=0.02 / math.sqrt(dim))
        nn.init.zeros_(self.vit_proj.bias)

    def forward(self, x_BND: Tensor, keep_BN: Tensor) -> tuple[Tensor, Tensor]:
        """(LM-space tokens [B, K, H], valid [B, K]) of the kept patches, in raster order."""
        merged_BKD, valid_BK = self.merger(x_BND, keep_BN, dense=False)
        return self.project(merged_BKD, valid_BK), valid_BK

    def project(self, merged_BKD: Tensor, valid_BK: Tensor) -> Tensor:
        """Merged tokens [B, K, D] (valid [B, K]) -> LM-space tokens [B, K, H]: the whitening, if any, then
        ``vit_proj``."""
        if self.whiten is not None:
            merged_BKD = self.whiten(merged_BKD, valid_BK)
        return self.vit_proj(merged_BKD)


@dataclass
class FrozenVisual:
    """What the frozen tokenizer gives for a batch of images: features, keep masks, and codes where asked."""

    x_BND: Tensor
    keep_BN: Tensor
    codes: list[Tensor | None]


class LavitLM(nn.Module):
    """LLaMA (``lm``) + understanding path (``visual``) + frozen tokenizer + text tokenizer.

    Args:
        cfg: the config.
        tokenizer: the frozen LaVIT tokenizer; None = load ``cfg.tokenizer``.
    """

    def __init__(self, cfg: LavitLMConfig, tokenizer: DynamicTokenizer | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.text_tokenizer = text_tokenizer_for(cfg.text_tokenizer)
        tokenizer = tokenizer if tokenizer is not None else load_frozen_tokenizer(cfg.tokenizer, cfg.tokenizer_preset)
        tokenizer.eval().requires_grad_(False)
        if cfg.visual_keep:  # the given tokenizer now tokenises this way for its every user
            tokenizer.cfg.eval_keep = cfg.visual_keep
        self._frozen = (tokenizer,)  # a tuple keeps it out of the module tree: not trained, saved or wrapped
        self.vocab = VisualVocab(len(self.text_tokenizer), tokenizer.cfg.codebook_size)
        codebook = tokenizer.quantize.codebook
        wants_codebook = cfg.code_rows_init == "codebook" and not codebook.is_meta
        self.lm = build_language_model(cfg.llm, self.vocab, codebook if wants_codebook else None)
        if cfg.llm.path:  # record the folder's sizes: checkpoints rebuild the LLaMA from them
            cfg.llm = spec_from_hf_config(self.lm.config, cfg.llm.path)
            check_context_length(cfg)
        self.visual = VisualInput(tokenizer, self.lm.config.hidden_size, cfg.whiten_visual)
        self.visual.merger.requires_grad_(cfg.train_merger)
        self.visual.vit_proj.requires_grad_(cfg.train_vit_proj)
        if cfg.understand_ratio == 0:  # no [image, text] samples: nothing would train the understanding path
            self.visual.requires_grad_(False)
        self.register_buffer("tokenizer_digest", torch.zeros(DIGEST_BYTES, dtype=torch.uint8))
        self.attached_digest = _digest(tokenizer)
        self.tokenizer_digest.copy_(self.attached_digest)

    @property
    def tokenizer(self) -> DynamicTokenizer:
        return self._frozen[0]

    @property
    def device(self) -> torch.device:
        return self.tokenizer_digest.device

    @property
    def eos_id(self) -> int:
        return int(self.text_tokenizer.eos_token_id)

    @property
    def bos_id(self) -> int:
        bos = self.text_tokenizer.bos_token_id
        return int(bos if bos is not None else self.eos_id)

    @property
    def pad_id(self) -> int:
        pad = self.text_tokenizer.pad_token_id
        return int(pad if pad is not None else self.eos_id)

    def encode_text(self, text: str) -> list[int]:
        """Text ids without special tokens."""
        return list(self.text_tokenizer(text, add_special_tokens=False).input_ids)

    def tokenizer_on(self, device: torch.device) -> DynamicTokenizer:
        """The frozen tokenizer, moved to ``device`` first when it is elsewhere."""
        tok = self.tokenizer
        if tok.decoder.pos_embed.device != device:
            tok.to(device)
        return tok

    def check_digest(self, where: str) -> None:
        """After loading weights: refuse a tokenizer other than the one the LM was trained with."""
        stored = self.tokenizer_digest.cpu()
        if stored.any() and not torch.equal(stored, self.attached_digest.cpu()):
            raise UserError(f"{where}: this LM was trained with another visual tokenizer (weights digest "
                            f"{stored.numpy().tobytes().hex()[:12]}, the given one's is "
                            f"{self.attached_digest.numpy().tobytes().hex()[:12]})")  # fmt: skip

    @torch.no_grad()
    def frozen_visual(self, images_B3SS: Tensor, with_codes: list[bool]) -> FrozenVisual:
        """Encoder features [B, N, D], keep masks [B, N] and, where ``with_codes``, code ids [K_b] (fp32).

        Mirrors :meth:`DynamicTokenizer.tokenize` (tested equal) but runs the encoder once for both paths.
        """
        tok = self.tokenizer_on(images_B3SS.device)
        with torch.autocast(images_B3SS.device.type, enabled=False):
            x_BND = tok.encoder(images_B3SS.float())
            keep_BN = tok.inference_keep(tok.token_predictor(x_BND))
            codes: list[Tensor | None] = [None] * len(x_BND)
            pick = [b for b, want in enumerate(with_codes) if want]
            if pick:
                merged, valid = tok.causal_encoder(x_BND[pick], keep_BN[pick], dense=tok.cfg.eval_merger == "dense")
                ids_BK = tok.quantize.encode(tok.encode_task_layer(merged))
                for j, b in enumerate(pick):
                    codes[b] = ids_BK[j, valid[j]]
        return FrozenVisual(x_BND, keep_BN, codes)

    def embed(self, input_ids_RL: Tensor, visual_BKH: Tensor | None, slots: dict[str, Tensor] | None) -> Tensor:
        """Input embeddings [R, L, H]: word embeddings, with the continuous visual tokens written into their slots.

        Args:
            input_ids_RL: token ids (anything at slot positions).
            visual_BKH: LM-space visual tokens of the images the slots name (``slot_image`` indexes its rows).
            slots: ``slot_row``, ``slot_col``, ``slot_image``, ``slot_rank`` [S] (None or S = 0: no slots).
        """
        emb_RLH = self.lm.get_input_embeddings()(input_ids_RL)
        if slots is None or visual_BKH is None or len(slots["slot_row"]) == 0:
            return emb_RLH
        values_SH = visual_BKH[slots["slot_image"], slots["slot_rank"]].to(emb_RLH.dtype)
        return emb_RLH.index_put((slots["slot_row"], slots["slot_col"]), values_SH)


def _digest(tokenizer: DynamicTokenizer) -> Tensor:
    from vlpretrain.lavit.detokenizer_task import tokenizer_digest  # one definition of "the same tokenizer"

    if any(p.is_meta for p in tokenizer.parameters()):
        return torch.zeros(DIGEST_BYTES, dtype=torch.uint8)
    return tokenizer_digest(tokenizer)


__all__ = [
    "FrozenVisual",
    "LavitLM",
    "LavitLMConfig",
    "VisualInput",
    "build_language_model",
    "extend_vocabulary",
    "text_tokenizer_for",
]
