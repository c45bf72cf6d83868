"""Libra's whole tiny recipe on the shapes world, timed: text LM -> visual codes -> stage 1 -> eval -> stage 2 -> eval.

``python -m benchmarks.libra_recipe [--out runs/libra_tiny] [--data runs/demo/data] [--encoder FILE]``

1. the shared text tokenizer folder (``vlpretrain libra text-tokenizer``) and the text LM's shards
   (:func:`vlpretrain.libra.text_data.write_text_shards`: the shapes-world shards with a fixed-order list of the
   attribute words before half of the captions, so that the frozen LM can tell "red" from "blue");
2. ``text-lm`` (configs/libra_text_lm_tiny.yaml): the LLaMA that stage 1 freezes, on captions + QA text;
3. ``libra-tokenizer`` (configs/libra_tokenizer_tiny.yaml): the lookup-free quantiser on the frozen demo encoder;
4. ``libra-pretrain`` (configs/libra_pretrain_tiny.yaml), then caption attribute F1 on held-out images and the
   text-only identity with the frozen LM;
5. ``libra-instruct`` (configs/libra_instruct_tiny.yaml), then VQA accuracy (and caption F1 after stage 2).

Prerequisites shared with the LaVIT demo (made here when missing, outside the timed budget): the shapes-world
shards (``vlpretrain data synth``) and the demo's frozen ViT, whose checkpoint format
(:func:`vlpretrain.lavit.demo_encoder.save_demo_encoder`) is read through ``core.encoders``; training it uses the
LaVIT demo's code, which this script (not a system folder) may import. Writes ``OUT/recipe.json`` (every stage's
seconds and metrics) and prints it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path
from typing import Any

from vlpretrain.configs import load_config
from vlpretrain.train.config import TrainConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _train(config: str, overrides: list[str], data: Path) -> dict[str, float]:
    """One stage through the shared loop, reading ``data``'s shards."""
    from vlpretrain.train.loop import train

    cfg = load_config(TrainConfig, "train", CONFIGS / config, overrides)
    cfg.data.train, cfg.data.val = str(data / "train"), str(data / "val")
    cfg.log.progress = False
    return train(cfg)


def _prerequisites(data: Path, encoder: Path) -> None:
    if not (data / "train").is_dir():
        from vlpretrain.data.synth_write import write_shapes_world
        from vlpretrain.data.synthetic import SynthConfig

        write_shapes_world(SynthConfig(), data, workers=1, progress=False)
    if not encoder.is_file():
        from vlpretrain.configs import get_preset
        from vlpretrain.data.synthetic import SynthConfig
        from vlpretrain.lavit.demo_encoder import pretrain_demo_encoder, save_demo_encoder

        vit, metrics = pretrain_demo_encoder(get_preset("demo-encoder", "tiny"), SynthConfig(), progress=False)
        save_demo_encoder(vit, encoder, metrics)


def run(out: Path, data: Path, encoder: Path, eval_images: int) -> dict[str, Any]:
    """Every stage in order; returns ``{"stages": {name: {"seconds", ...metrics}}, ...}``."""
    from vlpretrain.libra.evaluate import run as evaluate
    from vlpretrain.libra.text import save_text_tokenizer
    from vlpretrain.libra.text_data import write_text_shards

    _prerequisites(data, encoder)
    stages: dict[str, dict[str, float]] = {}
    text_tok, text_lm, codes, text_data = out / "text_tokenizer", out / "text_lm", out / "tokenizer", out / "text_data"
    pretrain, instruct = out / "pretrain", out / "instruct"
    start = time.perf_counter()

    def timed(name: str, fn: Any) -> None:
        t0 = time.perf_counter()
        metrics = fn() or {}
        stages[name] = {"seconds": round(time.perf_counter() - t0, 1)} | metrics
        print(f"[libra recipe] {name}: {json.dumps(stages[name])}", flush=True)

    timed("text_tokenizer", lambda: save_text_tokenizer("shapes-world-libra", text_tok) and None)
    timed("text_data", lambda: {split: write_text_shards(data / split, text_data / split)["with_list"]
                                for split in ("train", "val")})  # fmt: skip
    trained = {  # stage -> (config, overrides)
        "text_lm": ("libra_text_lm_tiny.yaml", [f"out_dir={text_lm}", f"model.tokenizer={text_tok}"]),
        "visual_codes": ("libra_tokenizer_tiny.yaml", [f"out_dir={codes}", f"model.encoder.path={encoder}"]),
        "stage1": ("libra_pretrain_tiny.yaml", [f"out_dir={pretrain}", f"model.text_lm={text_lm}",
                                                f"model.tokenizer={codes}"]),
        "stage2": ("libra_instruct_tiny.yaml", [f"out_dir={instruct}", f"model.init={pretrain}"]),
    }  # fmt: skip
    for name in ("text_lm", "visual_codes", "stage1"):
        timed(name, lambda name=name: _train(*trained[name], text_data if name == "text_lm" else data))
    timed("stage1_eval", lambda: evaluate(pretrain, data / "test", limit=eval_images, vqa=False, text_lm=text_lm,
                                          out=pretrain / "eval"))  # fmt: skip
    timed("stage2", lambda: _train(*trained["stage2"], data))
    timed("stage2_eval", lambda: evaluate(instruct, data / "test", limit=eval_images, out=instruct / "eval"))
    return {"date": datetime.date.today().isoformat(), "total_seconds": round(time.perf_counter() - start, 1),
            "threads": os.environ.get("OMP_NUM_THREADS", "default"), "load_average": os.getloadavg(),
            "eval_images": eval_images, "stages": stages}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.libra_recipe", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/libra_tiny"))
    parser.add_argument("--data", type=Path, default=Path("runs/demo/data"))
    parser.add_argument("--encoder", type=Path, default=Path("runs/demo/encoder/vit.safetensors"))
    parser.add_argument("--eval-images", type=int, default=200)
    args = parser.parse_args(argv)
    result = run(args.out, args.data, args.encoder, args.eval_images)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recipe.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
