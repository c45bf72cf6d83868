"""Peak matmul throughput of this machine, for model FLOP utilisation (MFU)."""

from __future__ import annotations

import functools
import time

import torch


@functools.cache
def measure_peak_flops(dtype: torch.dtype = torch.bfloat16, device: str = "cpu", size: int = 1024) -> float:
    """FLOP/s of a square ``size`` matmul in ``dtype`` on ``device`` (best of a few runs)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(5):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def transformer_flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token of a decoder (forward + backward): 6N plus the attention score terms."""
    return 6.0 * n_params + 12.0 * n_layers * hidden * seq_len
