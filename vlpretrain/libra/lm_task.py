"""Training stages ``libra-pretrain`` (stage 1) and ``libra-instruct`` (stage 2) of Libra's routed LM.

- stage 1: captioning sequences ``<s> [img] \\n caption </s>`` (:func:`~vlpretrain.libra.sequences.caption_sample`),
  targets = the image codes of both streams, ``<eoi>`` and the caption; the LLaMA is frozen (``train_lm: false``:
  only ``model.vision.*`` trains, i.e. experts, bridges, image embeddings, final image norm and heads), so text-only
  behaviour stays exactly the frozen LM's.
- stage 2: Vicuna-v1 conversations over an image's question-answer pairs (all of them, in a per-image shuffled
  order; with ``caption_round_prob`` a caption request first); only the answers are targets; everything trains
  except the image heads and final image norm, which no stage-2 target reaches.

The frozen visual tokenizer (``model.tokenizer``, a ``libra-tokenizer`` folder) is held outside the module tree:
not trained, not saved, not wrapped by DDP. Sequences are assembled in the data loader with placeholders at the code
positions, so ``num_targets`` is known before the forward pass; the forward pass tokenizes the images and fills them
in. Right-padded rows need no attention mask (causal attention never reaches the padding; padded rows carry no
target), which keeps SDPA on its causal fast path.

Presets: ``tiny`` (the demo: a 4-layer, 128-wide LLaMA trained by ``text-lm``, on the demo tokenizer) and ``paper``
(LLaMA-2-7B dimensions, stage 1 rows of 700 tokens, stage 2 of 2048).
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM

from vlpretrain.configs import ConfigError, register_preset
from vlpretrain.core.llm import LlamaSpec, build_llama, non_embedding_params
from vlpretrain.data.shards import decode_pair
from vlpretrain.errors import UserError
from vlpretrain.libra.config import LibraConfig
from vlpretrain.libra.loss import libra_loss
from vlpretrain.libra.model import LibraLM
from vlpretrain.libra.sequences import Assembled, Segment, assemble, caption_sample, chat_sample, fill_images
from vlpretrain.libra.text import BUILTIN, CAPTION_REQUEST, ChatTemplate, load_libra_text_tokenizer, newline_id
from vlpretrain.libra.tokenizer_task import codes_tiny, load_visual_tokenizer
from vlpretrain.libra.visual_codes import HybridImageTokenizer
from vlpretrain.libra.vocab import VisualVocab
from vlpretrain.train.flops import transformer_flops_per_token

PRETRAIN, INSTRUCT = "libra-pretrain", "libra-instruct"
_ARCHITECTURE = ("llm", "text_tokenizer", "tokenizer", "codes", "text_vocab", "down_ratio", "bridge_rank")
# Few wide heads: CPU flash attention runs 2 heads of 64 about twice as fast as 8 of 16 (docs/libra.md).
_TINY_LLM = dict(hidden_size=128, intermediate_size=344, num_layers=4, num_heads=2, num_kv_heads=2, max_positions=256)
_PAPER_LLM = dict(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32,
                  max_positions=4096, rms_norm_eps=1e-6)  # fmt: skip


@register_preset(PRETRAIN, "tiny")
def pretrain_tiny() -> LibraConfig:
    """Stage 1 of the demo: the 4 x 128 LLaMA (give ``text_lm``), rows of 80 tokens (16 image positions)."""
    return LibraConfig(llm=LlamaSpec(**_TINY_LLM), codes=codes_tiny(), max_len=80)


@register_preset(PRETRAIN, "paper")
def pretrain_paper() -> LibraConfig:
    """Stage 1 at LLaMA-2-7B dimensions, rows of 700 (give ``llm.path``, ``text_tokenizer`` and ``tokenizer``)."""
    return LibraConfig(llm=LlamaSpec(**_PAPER_LLM), max_len=700)


@register_preset(INSTRUCT, "tiny")
def instruct_tiny() -> LibraConfig:
    """Stage 2 of the demo (give ``init``): everything trains, rows of 160 tokens."""
    return LibraConfig(
        llm=LlamaSpec(**_TINY_LLM), codes=codes_tiny(), max_len=160, train_lm=True, caption_round_prob=0.2
    )


@register_preset(INSTRUCT, "paper")
def instruct_paper() -> LibraConfig:
    """Stage 2 at LLaMA-2-7B dimensions, rows of 2048 (give ``init``)."""
    return LibraConfig(llm=LlamaSpec(**_PAPER_LLM), max_len=2048, train_lm=True)


class LibraCollate:
    """Raw pair sample -> image + caption + QA; a list of those -> images and an assembled batch (picklable).

    Args:
        stage: "pretrain" (captions) or "instruct" (conversations).
        tokenizer: the text tokenizer.
        vocab: the id layout.
        num_patches, image_size: of the frozen tokenizer.
        cfg: the LM config (max_len, caption_round_prob).
        seed: the data seed (conversation order and caption rounds are a function of it and the image key).
    """

    def __init__(self, stage: str, tokenizer: Any, vocab: VisualVocab, num_patches: int, image_size: int,
                 cfg: LibraConfig, seed: int) -> None:  # fmt: skip
        self.stage, self.tokenizer, self.vocab = stage, tokenizer, vocab
        self.num_patches, self.image_size, self.seed = num_patches, image_size, seed
        self.max_len, self.caption_round_prob = cfg.max_len, cfg.caption_round_prob
        self.ids = special_ids(tokenizer)
        self.template = ChatTemplate(tokenizer)

    def decode(self, sample: dict[str, Any]) -> dict[str, Any]:
        pair = decode_pair(sample, self.image_size)
        qa = pair["meta"].get("qa", [])
        if self.stage == "instruct" and not qa:
            raise ValueError(f"key={pair['key']}: no question-answer pairs ('qa' in the metadata) for stage 2")
        return {"image": pair["image"], "caption": pair["caption"], "qa": qa, "key": pair["key"]}

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def sample(self, example: dict[str, Any]) -> list[Segment]:
        """The training sequence of one example (see the module docstring)."""
        bos, eos, nl = self.ids["bos"], self.ids["eos"], self.ids["newline"]
        if self.stage == "pretrain":
            return caption_sample(bos, nl, self.encode(example["caption"].lower()), eos)
        rng = random.Random(f"libra-chat/{self.seed}/{example['key']}")
        rounds = [(self.encode(q["question"]), self.encode(q["answer"])) for q in example["qa"]]
        rng.shuffle(rounds)
        if rng.random() < self.caption_round_prob:
            rounds.insert(0, (self.encode(CAPTION_REQUEST), self.encode(example["caption"])))
        t = self.template
        return chat_sample(bos, nl, eos, t.system, t.user, t.assistant, rounds)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = assemble([self.sample(ex) for ex in examples], self.vocab, self.num_patches, self.max_len,
                         self.ids["pad"], self.ids["bos"])  # fmt: skip
        return {"image": torch.stack([ex["image"] for ex in examples]), "key": [ex["key"] for ex in examples],
                **vars(batch)}  # fmt: skip


def special_ids(tokenizer: Any) -> dict[str, int]:
    """``bos``, ``eos``, ``pad`` (= eos when the tokenizer has none) and ``newline`` ids."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("text_tokenizer: no end-of-sequence token")
    bos = tokenizer.bos_token_id
    pad = tokenizer.pad_token_id
    return {"bos": int(bos if bos is not None else eos), "eos": int(eos), "pad": int(pad if pad is not None else eos),
            "newline": newline_id(tokenizer)}  # fmt: skip


class LibraLMTask(nn.Module):
    """Libra's routed LM + loss as a training stage; one target = one predicted token (per stream-averaged)."""

    config_cls = LibraConfig
    target_unit = "tok"
    stage = "pretrain"

    def __init__(self, cfg: LibraConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.init:
            _take_architecture(cfg)
        tokenizer = load_visual_tokenizer(cfg.tokenizer, cfg.codes)
        self._frozen = (tokenizer,)  # a tuple keeps it out of the module tree: not trained, saved or wrapped
        lm, self.text_tokenizer = _language_model(cfg)
        vocab = VisualVocab(lm.config.vocab_size, tokenizer.cfg.codebook_size, tokenizer.cfg.num_codebooks)
        if self.text_tokenizer.vocab_size > vocab.text_size:  # (added tokens such as LLaMA's <img_ph> are not fed)
            raise ConfigError(f"text_tokenizer: {self.text_tokenizer.vocab_size} ids, the LLaMA has "
                              f"{vocab.text_size} rows")  # fmt: skip
        self.model = LibraLM(lm, vocab, tokenizer.feature_dim, cfg.down_ratio, cfg.bridge_rank, cfg.expert_init)
        self.ids = special_ids(self.text_tokenizer)
        if cfg.init:
            from vlpretrain.train.pretrained import load_weights, resolve_checkpoint

            load_weights(self, resolve_checkpoint(cfg.init) / "model.safetensors")
        self.model.lm.requires_grad_(cfg.train_lm)
        if self.stage == "instruct":  # no image targets in stage 2: nothing reaches these
            self.model.vision.heads.requires_grad_(False)
            self.model.vision.norm.requires_grad_(False)
        self._tokens_per_target = 2.0

    @property
    def tokenizer(self) -> HybridImageTokenizer:
        return self._frozen[0]

    @property
    def vocab(self) -> VisualVocab:
        return self.model.vocab

    @property
    def device(self) -> torch.device:
        return self.model.vision.norm.weight.device

    def tokenizer_on(self, device: torch.device) -> HybridImageTokenizer:
        """The frozen tokenizer, moved to ``device`` first when it is elsewhere."""
        if self.tokenizer.quant_conv.weight.device != device:
            self.tokenizer.to(device)
        return self.tokenizer

    @torch.no_grad()
    def tokenize_images(self, images_B3HW: Tensor) -> tuple[Tensor, Tensor]:
        """Codes [B, C, N] and features [B, N, F] of images in [0, 1] (fp32, frozen)."""
        out = self.tokenizer_on(self.device)(images_B3HW.to(self.device))
        return out.codes_BCN, out.features_BNF

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Summed next-token loss over the batch's targets, with ``ce_text``/``ce_image`` means."""
        codes_BCN, feats_BNF = self.tokenize_images(batch["image"])
        asm = Assembled(batch["ids_BL"], batch["patch_BL"], batch["target_BL"], batch["attention_mask_BL"])
        ids_CBL, feats_BLF, labels_CBL = fill_images(asm, codes_BCN, feats_BNF, self.vocab)
        mask = asm.attention_mask_BL.to(self.device)
        right_padded = bool((mask[:, 1:] <= mask[:, :-1]).all())
        out = self.model(ids_CBL, feats_BLF, None if right_padded else mask)
        loss, parts = libra_loss(self.model, out.hidden_BLH, out.vision_BL, labels_CBL, self.cfg.visual_loss_weight)
        return {"loss": loss, **parts}

    def num_targets(self, batch: dict[str, Any]) -> int:
        targets = int(batch["target_BL"][:, 1:].sum())
        self._tokens_per_target = int(batch["attention_mask_BL"].sum()) / max(targets, 1)
        return targets

    def flops_per_target(self) -> float:
        """Approximate: 6 x (LLaMA non-embedding parameters) per token (a token meets either modality's weights,
        and the experts are smaller), times tokens per target."""
        c = self.model.lm.config
        per_token = transformer_flops_per_token(non_embedding_params(self.model.lm), c.num_hidden_layers,
                                                c.hidden_size, self.cfg.max_len)  # fmt: skip
        return per_token * self._tokens_per_target

    def shard_units(self) -> list[nn.Module]:
        # The routed layer is one call of its VisionLayer (the HF text layer's modules are called from inside it and
        # stay in the root unit), so FSDP shards the experts per layer and the LLaMA with the root.
        return list(self.model.vision.layers)

    def build_dataset(self, data_cfg: Any, split: str, rank: int, world_size: int) -> Any:
        from vlpretrain.train.streams import pair_dataset

        collate = self.collate(data_cfg.seed)
        return pair_dataset(data_cfg, split, rank, world_size, decode=collate.decode, collate=collate)

    def collate(self, seed: int = 0) -> LibraCollate:
        tok = self.tokenizer
        return LibraCollate(self.stage, self.text_tokenizer, self.vocab, tok.num_patches, tok.image_size, self.cfg,
                            seed)  # fmt: skip


class LibraPretrainTask(LibraLMTask):
    """Stage 1 (``libra-pretrain``): captions, LLaMA frozen."""

    stage = "pretrain"


class LibraInstructTask(LibraLMTask):
    """Stage 2 (``libra-instruct``): Vicuna-v1 conversations, everything trains."""

    stage = "instruct"


def _take_architecture(cfg: LibraConfig) -> None:
    """Copy the architecture fields of the ``init`` checkpoint's config into ``cfg`` (see :class:`LibraConfig`)."""
    from vlpretrain.train.pretrained import resolve_checkpoint
    from vlpretrain.train.task import model_config_from_dict

    folder = resolve_checkpoint(cfg.init)
    config = json.loads((folder / "config.json").read_text())
    if config.get("task") not in (PRETRAIN, INSTRUCT):
        raise UserError(f"model.init: {folder} is a '{config.get('task')}' checkpoint, not a Libra LM")
    base: LibraConfig = model_config_from_dict(config["task"], config["model"])
    for name in _ARCHITECTURE:
        setattr(cfg, name, getattr(base, name))
    cfg.llm = replace(cfg.llm, path="")


def _language_model(cfg: LibraConfig) -> tuple[LlamaForCausalLM, Any]:
    """The LLaMA and text tokenizer (from ``text_lm``, ``llm.path`` or random); records the LLaMA's sizes in cfg."""
    if cfg.text_lm:
        from vlpretrain.train.pretrained import load_task

        source, record = load_task(cfg.text_lm, expect_task="text-lm")
        spec = record["model"]["tokenizer"]
        if cfg.text_tokenizer and cfg.text_tokenizer != spec:
            raise ConfigError(f"text_tokenizer: '{cfg.text_tokenizer}' differs from the text LM's ('{spec}')")
        cfg.text_tokenizer = spec
        lm, tokenizer = source.lm, source.tokenizer
        lm.train()
    else:
        cfg.text_tokenizer = cfg.text_tokenizer or BUILTIN
        tokenizer = load_libra_text_tokenizer(cfg.text_tokenizer)
        lm = build_llama(cfg.llm, vocab_size=cfg.text_vocab or len(tokenizer))
    cfg.llm, cfg.text_vocab = llama_spec(lm.config), lm.config.vocab_size
    if cfg.max_len > cfg.llm.max_positions:
        raise ConfigError(f"max_len: {cfg.max_len} exceeds the LLaMA's positions ({cfg.llm.max_positions})")
    return lm, tokenizer


def llama_spec(config: LlamaConfig) -> LlamaSpec:
    """The :class:`LlamaSpec` that rebuilds a LLaMA of this config (path empty: checkpoints hold the weights)."""
    rope = getattr(config, "rope_parameters", None) or {}
    return LlamaSpec(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                     num_layers=config.num_hidden_layers, num_heads=config.num_attention_heads,
                     num_kv_heads=config.num_key_value_heads or config.num_attention_heads,
                     max_positions=config.max_position_embeddings,
                     rope_theta=float(rope.get("rope_theta", 10000.0)), rms_norm_eps=config.rms_norm_eps)  # fmt: skip


def load_libra(path: str | Path, device: str | torch.device = "cpu",
               tokenizer: str | Path | None = None) -> tuple[LibraLMTask, dict[str, Any]]:  # fmt: skip
    """A ``libra-pretrain``/``libra-instruct`` checkpoint (run or converted folder) in eval mode, with its frozen
    tokenizer (``tokenizer``, a ``libra-tokenizer`` folder, replaces the recorded one); ``text_lm``/``init``/
    ``llm.path`` are not read again (the checkpoint holds every weight)."""
    from vlpretrain.train.pretrained import load_weights, resolve_checkpoint
    from vlpretrain.train.task import model_config_from_dict, task_class

    folder = resolve_checkpoint(path)
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    name = config.get("task")
    if name not in (PRETRAIN, INSTRUCT):
        raise UserError(f"{folder}: a '{name}' checkpoint, not a Libra LM ({PRETRAIN} or {INSTRUCT})")
    cfg: LibraConfig = model_config_from_dict(name, config["model"])
    cfg.text_lm, cfg.init, cfg.llm.path = "", "", ""
    cfg.tokenizer = str(tokenizer) if tokenizer is not None else _relative_to(cfg.tokenizer, folder)
    if not cfg.tokenizer and config.get("converted_from"):
        raise UserError(f"{folder}: converted without a visual tokenizer; give a libra-tokenizer folder")
    cfg.text_tokenizer = _relative_to(cfg.text_tokenizer, folder)
    task = task_class(name)(cfg)
    load_weights(task, folder / "model.safetensors")
    task.to(device)
    return task.eval(), config


def _relative_to(path: str, folder: Path) -> str:
    """A recorded path relative to the checkpoint folder when it names something there (converted folders)."""
    if path and not Path(path).is_absolute() and (folder / path).exists():
        return str(folder / path)
    return path


__all__ = [
    "INSTRUCT",
    "PRETRAIN",
    "LibraCollate",
    "LibraInstructTask",
    "LibraLMTask",
    "LibraPretrainTask",
    "instruct_paper",
    "instruct_tiny",
    "llama_spec",
    "load_libra",
    "pretrain_paper",
    "pretrain_tiny",
    "special_ids",
]
