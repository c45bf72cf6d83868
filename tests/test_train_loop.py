"""The training loop in one process: learning, gradient accumulation, non-finite steps, checkpoint safety."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from vlpretrain.configs import ConfigError
from vlpretrain.tasks.text_lm import TextLMTask
from vlpretrain.train import checkpoint as ckpt_module
from vlpretrain.train.checkpoint import latest_checkpoint, list_checkpoints
from vlpretrain.train.config import CheckpointConfig, DataConfig, LogConfig, ScheduleConfig, TrainConfig
from vlpretrain.train.distributed import init_distributed
from vlpretrain.train.loop import TrainingDiverged, evaluate, run_loop, setup, train, train_step


def tiny_config(data: Path, out: Path, **overrides) -> TrainConfig:
    cfg = TrainConfig(
        task="text-lm",
        data=DataConfig(train=str(data / "train"), val=str(data / "val"), batch_size=8, shuffle_buffer=0),
        steps=10,
        precision="fp32",
        schedule=ScheduleConfig(warmup_steps=2),
        checkpoint=CheckpointConfig(every=5, keep_last=5),
        log=LogConfig(every=1, progress=False, eval_batches=4, peak_tflops=1.0),
        out_dir=str(out),
    )
    return dataclasses.replace(cfg, **overrides)


def weights(run) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in run.task.state_dict().items()}


def test_tiny_lm_learns(shapes_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(shapes_data, tmp_path, steps=120, precision="bf16")
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, batch_size=16, shuffle_buffer=64),
        optim=dataclasses.replace(cfg.optim, lr=3e-3),
        log=dataclasses.replace(cfg.log, every=20),
    )
    run = setup(cfg, init_distributed(), resume=False)
    before = evaluate(run)["val_loss"]
    after = run_loop(run)["val_loss"]
    assert after < 0.45 * before, (before, after)
    assert (tmp_path / "metrics.jsonl").read_text().count('"loss"') == 120 // 20


def test_gradient_accumulation_equals_larger_batch(shapes_data: Path, tmp_path: Path) -> None:
    results = []
    for batch, accum in [(16, 1), (8, 2)]:
        cfg = tiny_config(shapes_data, tmp_path / f"b{batch}", steps=3, grad_accum=accum)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=batch))
        run = setup(cfg, init_distributed(), resume=False)
        losses = [train_step(run, [next(iter_) for _ in range(accum)])["loss"] for iter_ in [iter(run.stream)]
                  for _ in range(3)]  # fmt: skip
        results.append((losses, weights(run)))
    (loss_a, w_a), (loss_b, w_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for key in w_a:
        torch.testing.assert_close(w_a[key], w_b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_non_finite_steps_are_skipped_then_stop_the_run(shapes_data, tmp_path, monkeypatch) -> None:
    forward = TextLMTask.forward
    calls = {"n": 0}

    def flaky(self, batch):
        calls["n"] += 1
        out = forward(self, batch)
        if calls["n"] in (3, 4):
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(TextLMTask, "forward", flaky)
    cfg = tiny_config(shapes_data, tmp_path, steps=6, max_bad_steps=3)
    run = setup(cfg, init_distributed(), resume=False)
    metrics = run_loop(run)
    assert metrics["skipped_steps"] == 2 and run.state.bad_in_a_row == 0

    calls["n"] = -100  # every call from now on is NaN
    monkeypatch.setattr(TextLMTask, "forward", lambda self, b: {"loss": forward(self, b)["loss"] * float("nan")})
    run = setup(dataclasses.replace(cfg, out_dir=str(tmp_path / "b")), init_distributed(), resume=False)
    before = weights(run)
    with pytest.raises(TrainingDiverged, match="step 3: non-finite loss or gradient 3 steps in a row"):
        run_loop(run)
    for key, value in weights(run).items():
        assert torch.equal(value, before[key]), key


def test_interrupted_checkpoint_write_keeps_previous(shapes_data, tmp_path, monkeypatch) -> None:
    cfg = tiny_config(shapes_data, tmp_path, steps=10)
    train(cfg)
    root = tmp_path / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step-00000005", "step-00000010"]
    good = (root / "step-00000010" / "model.safetensors").read_bytes()

    def crash(tensors, path):  # dies half-way through writing the weights
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(ckpt_module, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        train(dataclasses.replace(cfg, steps=15), resume=True)
    assert latest_checkpoint(root).name == "step-00000010"
    assert (root / "step-00000010" / "model.safetensors").read_bytes() == good
    assert (root / "step-00000015.tmp").exists()

    monkeypatch.undo()
    train(dataclasses.replace(cfg, steps=15), resume=True)
    assert latest_checkpoint(root).name == "step-00000015"
    assert not (root / "step-00000015.tmp").exists()


def test_bad_model_key_and_missing_data_fail_before_training(shapes_data, tmp_path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'model.hidden'"):
        setup(tiny_config(shapes_data, tmp_path, model={"hidden": 3}), init_distributed(), resume=False)
    with pytest.raises(ConfigError, match="data.train"):
        setup(tiny_config(tmp_path / "nowhere", tmp_path), init_distributed(), resume=False)
    assert not (tmp_path / "metrics.jsonl").exists()
