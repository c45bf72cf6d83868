"""Training stage ``lavit-lm``: LaVIT's unified LM pretrained on ``[image, text]``, ``[text, image]`` and text.

Per batch of B image-text pairs: the data loader plans the sequences (:func:`~vlpretrain.lavit.sequences.plan_batch`:
which pairs are understanding, generation or VQA samples, and the text-only documents); the task runs the frozen
tokenizer (features and keep masks of understanding images, code ids of generation images), builds the samples,
packs them into rows of ``max_len`` tokens (:mod:`vlpretrain.lavit.packing`) and takes the summed next-token loss over
the targets. The loop's ``num_targets`` needs the code counts before the forward pass, so the preparation runs there
first and is cached in the batch.

Learning rates: the LLM (``lm.*``) and the visual part (``visual.*``) take separate rates through ``optim.lr_groups``
(the paper: 5e-5 and 1.5e-4). Presets: ``tiny`` (the demo: a 3M-parameter LLaMA on the demo tokenizer), ``paper``
(LLaMA-7B dimensions, the official tokenizer sizes; needs ``model.text_tokenizer`` = a LLaMA tokenizer folder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from vlpretrain.configs import register_preset
from vlpretrain.core.llm import LlamaSpec, non_embedding_params
from vlpretrain.data.shards import decode_pair
from vlpretrain.errors import UserError
from vlpretrain.lavit.model import LavitLM, LavitLMConfig
from vlpretrain.lavit.packing import IGNORE, KIND_CODES, pack_samples, padding_waste
from vlpretrain.lavit.sequences import build_samples, plan_batch
from vlpretrain.lavit.tokenizer import DynamicTokenizer
from vlpretrain.train.flops import transformer_flops_per_token
from vlpretrain.train.pretrained import load_weights, resolve_checkpoint
from vlpretrain.train.task import model_config_from_dict

TASK = "lavit-lm"
_SLOT_KEYS = ("slot_row", "slot_col", "slot_image", "slot_rank")


@register_preset(TASK, "tiny")
def lm_tiny() -> LavitLMConfig:
    """The demo: a 4-layer, 256-wide LLaMA (about 3.8M parameters) on the demo tokenizer; half the understanding
    samples are VQA, so that the demo can answer questions, each asking up to six of its image's questions (all of
    them: the demo data's training images have five types plus a second yes/no question; ``qa_turns``: VQA
    0.65-0.76 after the demo's stage 1 over four seeds, 0.60 with one; docs/lm.md "Several questions per image" and
    "Yes and no about the same image"). The code
    rows start from the codebook (``code_rows_init``; ours: with the demo's generation-heavy stage 2, text-to-image
    0.08 -> 0.24-0.46, docs/lm.md "A generation-heavy stage 2")."""
    llm = LlamaSpec(hidden_size=256, intermediate_size=688, num_layers=4, num_heads=8, num_kv_heads=8,
                    max_positions=256)  # fmt: skip
    return LavitLMConfig(llm=llm, max_len=256, qa_ratio=0.5, qa_turns=6, code_rows_init="codebook")


@register_preset(TASK, "paper")
def lm_paper() -> LavitLMConfig:
    """LLaMA-7B dimensions, sequence length 2048, the official tokenizer sizes (K = 16384); captions only."""
    llm = LlamaSpec(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32,
                    max_positions=4096)  # fmt: skip
    return LavitLMConfig(llm=llm, text_tokenizer="", tokenizer_preset="paper", max_len=2048)


class LMCollate:
    """Raw pair sample -> image + text + QA; a list of those -> images and the batch's sequence plan (picklable)."""

    def __init__(self, text_tokenizer: Any, image_size: int, cfg: LavitLMConfig, seed: int) -> None:
        self.text_tokenizer, self.image_size, self.seed = text_tokenizer, image_size, seed
        self.ratios = (cfg.understand_ratio, cfg.qa_ratio, cfg.text_ratio)
        self.options = {"qa_turns": cfg.qa_turns, "caption_drop": cfg.caption_drop}  # plan_batch's keywords

    def decode(self, sample: dict[str, Any]) -> dict[str, Any]:
        pair = decode_pair(sample, self.image_size)
        qa = pair["meta"].get("qa", [])
        if not isinstance(qa, list) or not all(isinstance(q, dict) and {"question", "answer"} <= q.keys() for q in qa):
            raise ValueError(f"key={pair['key']}: metadata 'qa' must be a list of {{question, answer}} objects")
        return {"image": pair["image"], "caption": pair["caption"], "qa": qa, "key": pair["key"]}

    def tokenize(self, text: str) -> list[int]:
        return list(self.text_tokenizer(text, add_special_tokens=False).input_ids)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        plans, docs = plan_batch(examples, self.tokenize, *self.ratios, seed=self.seed, **self.options)
        return {"image": torch.stack([ex["image"] for ex in examples]), "plans": plans, "docs": docs,
                "key": [ex["key"] for ex in examples]}  # fmt: skip


class LavitLMTask(LavitLM):
    """The unified LM as a training stage; one target = one predicted token."""

    config_cls = LavitLMConfig
    target_unit = "tok"

    def __init__(self, cfg: LavitLMConfig, tokenizer: DynamicTokenizer | None = None) -> None:
        super().__init__(cfg, tokenizer)
        self._tokens_per_target = 2.0  # updated from every prepared batch (for MFU)
        if cfg.init:
            self.load_folder_weights(resolve_checkpoint(cfg.init))

    def load_folder_weights(self, folder: Path) -> None:
        """Load a ``lavit-lm`` checkpoint folder's ``model.safetensors`` strictly.

        Raises:
            UserError: embeddings without the visual rows, missing/unexpected/mis-shaped keys, or weights trained
                with another visual tokenizer.
        """
        _check_visual_rows(folder / "model.safetensors", self)
        load_weights(self, folder / "model.safetensors")
        self.check_digest(str(folder))

    @torch.no_grad()
    def prepare(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The packed rows of a planned batch (cached in ``batch["_packed"]``), on the model's device.

        Besides :func:`pack_samples`'s keys: ``x_BND``, ``keep_BN`` of the understanding images (``slot_image``
        indexes them).
        """
        if "_packed" in batch:
            return batch["_packed"]
        plans, device = batch["plans"], self.device
        frozen = self.frozen_visual(batch["image"].to(device), [p.kind == "generate" for p in plans])
        lengths = [int(n) for n in frozen.keep_BN.sum(dim=1).tolist()]
        codes = [c.tolist() if c is not None else None for c in frozen.codes]
        samples = build_samples(self.vocab, plans, batch["docs"], lengths, codes, self.bos_id, self.eos_id)
        packed = pack_samples(samples, self.cfg.max_len, self.pad_id)
        understand = [b for b, p in enumerate(plans) if p.kind == "understand"]
        local = torch.full((len(plans) + 1,), -1, dtype=torch.long)  # slot_image -> row of x_BND (index -1 unused)
        local[understand] = torch.arange(len(understand))
        packed["slot_image"] = local[packed["slot_image"]]
        packed = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in packed.items()}
        packed["x_BND"], packed["keep_BN"] = frozen.x_BND[understand], frozen.keep_BN[understand]
        targets = int((packed["labels"][:, 1:] != IGNORE).sum())
        self._tokens_per_target = packed["tokens"] / max(targets, 1)
        batch["_packed"] = packed
        return packed

    def logits(self, packed: dict[str, Any]) -> Tensor:
        """Logits [R, L, V] of packed rows (document-masked through the restarting position ids)."""
        return self.lm.lm_head(self._hidden_and_visual(packed)[0])

    def _hidden_and_visual(self, packed: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        """(last hidden states [R, L, H] of the packed rows, LM-space visual tokens [B, K, H] or None)."""
        visual_BKH = self.visual(packed["x_BND"], packed["keep_BN"])[0] if len(packed["x_BND"]) else None
        embeds_RLH = self.embed(packed["input_ids"], visual_BKH, {k: packed[k] for k in _SLOT_KEYS})
        # use_cache=False matters: with a cache HF would not derive the document mask from the position ids.
        out = self.lm.model(inputs_embeds=embeds_RLH, position_ids=packed["position_ids"], use_cache=False)
        return out.last_hidden_state, visual_BKH

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Summed cross-entropy over the batch's targets, plus the mean per kind and the padding fraction.

        The output layer runs on the target positions only (about a third of a packed row's tokens: prompts,
        captions before an image and image slots have none), which saves its FLOPs and the [R, L, V] logits."""
        packed = self.prepare(batch)
        hidden_RLH, visual_BKH = self._hidden_and_visual(packed)
        labels_RL = packed["labels"][:, 1:]
        where_RL = labels_RL != IGNORE
        logits_TV = self.lm.lm_head(hidden_RLH[:, :-1][where_RL])
        ce_T = F.cross_entropy(logits_TV.float(), labels_RL[where_RL], reduction="none")
        out = {"loss": ce_T.sum()}
        if visual_BKH is not None:  # keeps every visual parameter in the graph (DDP) when no slot used a token
            out["loss"] = out["loss"] + 0.0 * visual_BKH.float().sum()
        kinds_T = packed["kinds"][:, 1:][where_RL]
        for kind in ("understand", "generate", "text"):
            mask_T = kinds_T == KIND_CODES[kind]
            out[f"ce_{kind}"] = (ce_T * mask_T).sum().detach() / mask_T.sum().clamp(min=1)
        out["pad_frac"] = torch.tensor(padding_waste(packed), device=ce_T.device)
        return out

    def num_targets(self, batch: dict[str, Any]) -> int:
        return int((self.prepare(batch)["labels"][:, 1:] != IGNORE).sum())

    def flops_per_target(self) -> float:
        c = self.lm.config
        per_token = transformer_flops_per_token(non_embedding_params(self.lm), c.num_hidden_layers, c.hidden_size,
                                                self.cfg.max_len)  # fmt: skip
        return per_token * self._tokens_per_target

    def shard_units(self) -> list[nn.Module]:
        return list(self.lm.model.layers)

    def build_dataset(self, data_cfg: Any, split: str, rank: int, world_size: int) -> Any:
        from vlpretrain.train.streams import pair_dataset

        collate = LMCollate(self.text_tokenizer, self.tokenizer.encoder.image_size, self.cfg, data_cfg.seed)
        return pair_dataset(data_cfg, split, rank, world_size, decode=collate.decode, collate=collate)

    @torch.no_grad()
    def sample(self) -> dict[str, str]:
        """A caption of a fixed shapes-world image, and the visual length of an image drawn from its true caption."""
        from vlpretrain.data.synthetic import SynthConfig, make_example
        from vlpretrain.lavit.generate import SamplingConfig, caption_images, generate_codes, text_to_image_prompt

        ex = make_example(SynthConfig(image_size=self.tokenizer.encoder.image_size), "val", 0)
        image = torch.from_numpy(ex.image).permute(2, 0, 1).float().div(255)[None].to(self.device)
        was_training = self.training
        self.eval()
        try:
            caption = caption_images(self, image)[0]
            prompt = text_to_image_prompt(self, ex.caption)
            codes = generate_codes(
                self, [prompt], SamplingConfig(guidance_scale=1.0), torch.Generator().manual_seed(0)
            ).codes
        finally:
            self.train(was_training)
        return {"truth": ex.caption, "caption": caption, "generated_tokens": str(len(codes[0]))}


def _resolve(path: str, folder: Path) -> str:
    """A config path relative to the checkpoint folder when it names something there (converted folders)."""
    if path and not Path(path).is_absolute() and (folder / path).exists():
        return str(folder / path)
    return path


def load_lm(path: str | Path, tokenizer: DynamicTokenizer | str | Path | None = None,
            device: str | torch.device = "cpu") -> tuple[LavitLMTask, dict[str, Any]]:  # fmt: skip
    """A ``lavit-lm`` checkpoint (run, or converted) folder with its frozen tokenizer, in eval mode.

    Raises:
        UserError: not a ``lavit-lm`` folder (e.g. a text-only LM: no visual vocabulary), embeddings without the
            visual rows, a missing tokenizer, weights that do not fit, or another tokenizer than the one it was
            trained with.
    """
    folder = resolve_checkpoint(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"{folder}: no config.json")
    config = json.loads(config_file.read_text())
    if config.get("task") != TASK:
        raise UserError(f"{folder}: a '{config.get('task')}' checkpoint, not a LaVIT unified LM ('{TASK}'): "
                        "it has no visual vocabulary")  # fmt: skip
    cfg: LavitLMConfig = model_config_from_dict(TASK, config["model"])
    cfg.text_tokenizer = _resolve(cfg.text_tokenizer, folder)
    cfg.detokenizer = _resolve(cfg.detokenizer, folder)
    cfg.llm.path = cfg.init = ""  # the checkpoint holds the weights
    if isinstance(tokenizer, str | Path):
        cfg.tokenizer, tokenizer = str(tokenizer), None
    if tokenizer is None:
        cfg.tokenizer = _resolve(cfg.tokenizer, folder)
        if not cfg.tokenizer or not Path(cfg.tokenizer).exists():
            raise UserError(f"{folder}: its visual tokenizer '{cfg.tokenizer}' is not there; pass one (--tokenizer)")
    task = LavitLMTask(cfg, tokenizer)
    task.load_folder_weights(folder)
    task.to(device)
    task.tokenizer.to(device)
    return task.eval(), config


def _check_visual_rows(weights: Path, task: LavitLMTask) -> None:
    """Name the problem when the stored embeddings have no rows for ``[IMG]``, ``[/IMG]`` and the codes."""
    key = "lm.model.embed_tokens.weight"
    if not weights.is_file():
        raise UserError(f"{weights}: no such file")
    with safe_open(str(weights), framework="pt") as f:
        if key not in f.keys():  # noqa: SIM118  (a safetensors handle, not a dict)
            return  # load_weights names the missing key
        rows = f.get_slice(key).get_shape()[0]
    if rows != task.vocab.size:
        v = task.vocab
        raise UserError(f"{weights}: {key} has {rows} rows, but text ({v.text_size}) + [IMG], [/IMG] + "
                        f"{v.codebook_size} visual codes need {v.size}: no visual vocabulary")  # fmt: skip


__all__ = ["LMCollate", "LavitLMTask", "load_lm", "lm_paper", "lm_tiny"]
