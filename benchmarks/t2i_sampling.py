"""Text-to-image judge agreement of a trained LaVIT LM under several sampling settings, and its ceiling.

Each setting draws one image per held-out caption (``SamplingConfig`` fields as ``name=field:value,...``) and the
shapes-world judge compares what it reads with the caption's objects (count, colours, shapes), as ``vlpretrain eval
lm`` does. The setting ``oracle`` decodes the test images' own tokenizer codes instead: the best any LM could score
through that detokenizer (docs/lm.md, "Text-to-image at the demo's budget").

    python -m benchmarks.t2i_sampling --lm runs/demo/lm --data runs/demo/data --judge runs/demo/judge \\
        oracle default g1=guidance_scale:1.0 k5=top_k:5 t07=temperature:0.7
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from vlpretrain.eval.lm_quality import eval_text_to_image, judge_agreement
from vlpretrain.lavit.generate import SamplingConfig


def parse_setting(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name=field:value,field:value"`` -> (name, SamplingConfig keyword arguments); ``"name"`` alone: defaults."""
    name, _, fields = spec.partition("=")
    kwargs: dict[str, Any] = {}
    for item in filter(None, fields.split(",")):
        key, sep, value = item.partition(":")
        if not sep or key not in SamplingConfig.__dataclass_fields__:
            raise SystemExit(f"setting {spec!r}: expected field:value with a SamplingConfig field, got {item!r}")
        kwargs[key] = float(value) if "." in value else int(value)
    return name, kwargs


def run_setting(pipe: Any, judge: Any, images: list[Any], records: list[dict[str, Any]], name: str,
                kwargs: dict[str, Any], seed: int) -> dict[str, Any]:  # fmt: skip
    """Judge agreement and mean visual tokens of one setting (``oracle``: the images' own codes)."""
    start = time.perf_counter()
    if name == "oracle":
        codes = pipe.images.encode(images)
        scores = judge_agreement(judge, pipe.detokenizer.decode(codes, seed=seed, batch_size=16), records)
        scores |= {"mean": sum(scores.values()) / 3, "tokens": sum(len(c) for c in codes) / len(codes)}
    else:
        metrics, _ = eval_text_to_image(pipe, records, judge, seed, sampling=SamplingConfig(**kwargs))
        scores = {k.removeprefix("t2i_"): v for k, v in metrics.items()}
        scores["mean"], scores["tokens"] = scores.pop("prompt_match"), scores.pop("tokens_mean")
    rounded = {k: round(v, 3) for k, v in scores.items()}
    return {"setting": name, **kwargs, **rounded, "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> None:
    from vlpretrain.data.judge import load_judge
    from vlpretrain.data.shards import read_records
    from vlpretrain.lavit.pipeline import Pipeline

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lm", required=True, help="a lavit-lm run or checkpoint folder")
    parser.add_argument("--data", required=True, help="a shapes-world folder with a test/ split")
    parser.add_argument("--judge", required=True, help="the shapes-world judge folder")
    parser.add_argument("--detokenizer", default=None, help="default: the one the LM's config records")
    parser.add_argument("--prompts", type=int, default=64, help="held-out captions drawn per setting")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("settings", nargs="*", default=["default"], help="oracle, default, name=field:value,...")
    args = parser.parse_args(argv)
    settings = [parse_setting(s) for s in args.settings]
    pipe = Pipeline.from_pretrained(args.lm, detokenizer=args.detokenizer)
    if pipe.detokenizer is None:
        raise SystemExit(f"{args.lm}: no detokenizer recorded or given (--detokenizer)")
    images, records = read_records(f"{args.data}/test", limit=args.prompts)
    judge = load_judge(args.judge)
    for name, kwargs in settings:
        print(json.dumps(run_setting(pipe, judge, list(images), records, name, kwargs, args.seed)), flush=True)


if __name__ == "__main__":
    main()
