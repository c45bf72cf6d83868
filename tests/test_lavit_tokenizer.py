"""The dynamic tokenizer end to end on a tiny random configuration: losses, gradients, warm-up, encode/decode."""

from __future__ import annotations

import pytest
import torch

from vlpretrain.lavit.tokenizer import DynamicTokenizer, TokenizerConfig, count_statistics
from vlpretrain.lavit.tokenizer_task import LavitTokenizerTask


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    from vlpretrain.data.synthetic import SynthConfig, make_example

    cfg = SynthConfig()
    return torch.stack([torch.from_numpy(make_example(cfg, "train", i).image).permute(2, 0, 1) for i in range(6)]) / 255


def tiny(**overrides) -> DynamicTokenizer:
    torch.manual_seed(0)
    return DynamicTokenizer(TokenizerConfig(codebook_size=64, quant_warmup_steps=1, **overrides))


def test_training_forward_gives_per_image_losses_and_gradients(images) -> None:
    task = LavitTokenizerTask(TokenizerConfig(codebook_size=64, quant_warmup_steps=0))
    out = task({"image": images})
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    assert 0 <= out["keep_ratio"] <= 1 and -1 <= out["rec_cos"] <= 1
    out["loss"].backward()
    named = dict(task.named_parameters())
    for prefix in ("token_predictor", "causal_encoder", "encode_task_layer", "decoder.blocks", "decoder.in_proj"):
        grads = [p.grad for n, p in named.items() if n.startswith(f"tokenizer.{prefix}")]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), prefix
    assert all(p.grad is None and not p.requires_grad for n, p in named.items() if n.startswith("tokenizer.encoder."))
    assert task.num_targets({"image": images}) == 6 and task.flops_per_target() > 0


def test_quantisation_switches_on_after_the_warm_up(images) -> None:
    tok = tiny().train()
    before = tok.quantize.codebook.clone()
    first = tok(images)
    assert first.commit == 0 and torch.equal(tok.quantize.codebook, before)  # warm-up: no quantiser update
    second = tok(images)
    assert second.commit > 0 and not torch.equal(tok.quantize.codebook, before)
    assert int(tok.train_calls) == 2


def test_tokenize_then_decode(images) -> None:
    tok = tiny().eval()
    ids, keep = tok.tokenize(images)
    assert [len(s) for s in ids] == keep.sum(1).tolist()
    assert all(s.dtype == torch.long and (s.numel() == 0 or s.max() < 64) for s in ids)
    feats = tok.decode_codes(ids)
    assert feats.shape == (6, tok.num_patches, tok.encoder.dim) and torch.isfinite(feats).all()
    ids2, _ = tok.tokenize(images)
    assert all(torch.equal(a, b) for a, b in zip(ids, ids2, strict=True))  # deterministic by default


def test_kept_rows_tokenize_like_the_dense_training_path(images) -> None:
    tok = tiny().eval()
    x = tok.encoder(images)
    keep = tok.keep_mask(x)
    dense, valid = tok.causal_encoder(x, keep, dense=True)
    kept, _ = tok.causal_encoder(x, keep, dense=False)
    ids_dense = tok.quantize.encode(tok.encode_task_layer(dense))[valid]
    ids_kept = tok.quantize.encode(tok.encode_task_layer(kept))[valid]
    assert torch.equal(ids_dense, ids_kept)


def test_decode_rejects_bad_ids() -> None:
    tok = tiny().eval()
    with pytest.raises(ValueError, match=r"in \[0, 64\)"):
        tok.decode_codes([torch.tensor([1, 64])])
    with pytest.raises(ValueError, match="no sequences"):
        tok.decode_codes([])
    with pytest.raises(ValueError, match="more than the 64 patches"):
        tok.decode_codes([torch.zeros(65, dtype=torch.long)])
    assert tok.decode_codes([torch.zeros(0, dtype=torch.long)]).shape[0] == 1  # an empty sequence still decodes


def test_count_statistics() -> None:
    stats = count_statistics([torch.tensor([0, 1, 1]), torch.tensor([2])], codebook_size=8)
    assert stats["tokens_mean"] == 2.0 and stats["tokens_min"] == 1 and stats["tokens_max"] == 3
    assert stats["codes_used"] == 3 and stats["code_usage"] == 3 / 8
    p = torch.tensor([0.25, 0.5, 0.25])
    assert stats["code_perplexity"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())))


def test_dense_eval_merger_gives_the_same_tokens(images) -> None:
    kept, dense = tiny().eval(), tiny(eval_merger="dense").eval()
    ids_kept, _ = kept.tokenize(images)
    ids_dense, _ = dense.tokenize(images)
    assert all(torch.equal(a, b) for a, b in zip(ids_kept, ids_dense, strict=True))
