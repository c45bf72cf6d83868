"""The training loop through the real command line: SIGKILL + resume, DDP and FSDP2 under torchrun (gloo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from vlpretrain.train.checkpoint import latest_checkpoint

PY = sys.executable


def write_config(path: Path, root: Path, out: Path, **extra) -> Path:
    cfg = {
        "task": "text-lm",
        "data": {"train": str(root / "train"), "val": str(root / "val"), "batch_size": 8, "shuffle_buffer": 0},
        "steps": 30,
        "precision": "fp32",
        "optim": {"lr": 3.0e-3},
        "schedule": {"warmup_steps": 3},
        "checkpoint": {"every": 5, "keep_last": 10},
        "log": {"every": 1, "progress": False, "eval_every": 0, "eval_batches": 2, "peak_tflops": 1.0},
        "out_dir": str(out),
    }
    for key, value in extra.items():
        cfg[key] = cfg[key] | value if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(cfg))
    return path


def env() -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([PY, "-m", "vlpretrain", *args], capture_output=True, text=True, env=env(), timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    return proc


def torchrun(n: int, config: Path, *sets: str) -> None:
    cmd = [PY, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--standalone", "-m", "vlpretrain",
           "train", str(config), *[a for s in sets for a in ("--set", s)]]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def losses(out: Path) -> list[float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r]


def final_weights(out: Path) -> dict:
    return load_file(str(latest_checkpoint(out / "checkpoints") / "model.safetensors"))


def test_sigkill_then_resume_is_bitwise_identical(shapes_data: Path, tmp_path: Path) -> None:
    steps = {"steps": 60, "data": {"shuffle_buffer": 32, "num_workers": 2}, "precision": "bf16"}
    full = write_config(tmp_path / "full.yaml", shapes_data, tmp_path / "full", **steps)
    cli("train", str(full))

    killed = write_config(tmp_path / "killed.yaml", shapes_data, tmp_path / "killed", **steps)
    proc = subprocess.Popen(
        [PY, "-m", "vlpretrain", "train", str(killed)],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    target = tmp_path / "killed" / "checkpoints" / "step-00000010"
    deadline = time.time() + 300
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert latest_checkpoint(tmp_path / "killed" / "checkpoints").name < "step-00000060"

    cli("train", str(killed), "--resume")
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] == b[key]).all(), key
    assert losses(tmp_path / "full") == losses(tmp_path / "killed")


@pytest.mark.distributed
def test_ddp_two_ranks_equals_one_process_double_batch(shapes_one_shard: Path, tmp_path: Path) -> None:
    single = write_config(
        tmp_path / "single.yaml", shapes_one_shard, tmp_path / "single", steps=12, data={"batch_size": 16}
    )
    cli("train", str(single))
    ddp = write_config(tmp_path / "ddp.yaml", shapes_one_shard, tmp_path / "ddp", steps=12, parallel="ddp")
    torchrun(2, ddp)
    fsdp = write_config(tmp_path / "fsdp.yaml", shapes_one_shard, tmp_path / "fsdp", steps=12, parallel="fsdp")
    torchrun(2, fsdp)
    ref = losses(tmp_path / "single")
    assert len(ref) == 12 and ref[-1] < ref[0] - 1.0
    assert losses(tmp_path / "ddp") == pytest.approx(ref, rel=1e-4)
    assert losses(tmp_path / "fsdp") == pytest.approx(ref, rel=1e-3)
    ckpt = latest_checkpoint(tmp_path / "fsdp" / "checkpoints")
    assert ckpt.name == "step-00000012" and (ckpt / "rank_state" / "rank00001.pt").exists()


def test_cli_bad_config_is_one_line_exit_2(shapes_data: Path, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", shapes_data, tmp_path / "o")
    proc = cli("train", str(cfg), "--set", "optim.lrr=1", check=False)
    assert (
        proc.returncode == 2
        and proc.stderr.strip().splitlines() == [proc.stderr.strip()]
        and "unknown key 'optim.lrr'" in proc.stderr
    )
    proc = cli("train", str(cfg), "--set", f"data.train={tmp_path}/missing", check=False)
    assert proc.returncode == 2 and "data.train" in proc.stderr and "Traceback" not in proc.stderr
