"""The dynamic tokenizer end to end on a tiny random configuration: losses, gradients, warm-up, encode/decode."""

from __future__ import annotations

import math

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


def test_keep_entropy_term_adds_the_mean_binary_entropy(images) -> None:
    """``keep_entropy_weight`` w adds w x the mean over patches of -p log p - (1-p) log(1-p) to each image's loss,
    and its gradient reaches the selector (same Gumbel draws in both runs)."""
    from vlpretrain.lavit.selector import keep_entropy

    p = torch.tensor([[0.5, 0.9, 1.0]])
    logp = torch.stack([p, 1 - p], dim=-1).log()
    expected = torch.tensor([[math.log(2), -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)), 0.0]])
    torch.testing.assert_close(keep_entropy(logp), expected)
    plain, weighted = tiny().train(), tiny(keep_entropy_weight=0.5).train()
    x = plain.encoder(images)
    torch.manual_seed(1)
    base = plain.forward_features(x).loss_B
    torch.manual_seed(1)
    out = weighted.forward_features(x).loss_B
    entropy = keep_entropy(weighted.token_predictor(x)).mean(dim=1)
    torch.testing.assert_close(out - base, 0.5 * entropy.detach(), atol=1e-5, rtol=1e-4)
    out.sum().backward()
    assert weighted.token_predictor.out_conv[-2].weight.grad.abs().sum() > 0


def test_keep_entropy_gradient_is_finite_for_saturated_decisions() -> None:
    from vlpretrain.lavit.selector import keep_entropy

    logits = torch.tensor([[[0.0, 200.0], [-150.0, 150.0], [1.0, -1.0]]], requires_grad=True)
    entropy = keep_entropy(torch.log_softmax(logits, dim=-1))
    entropy.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 2].abs().sum() > 0
    assert entropy[0, :2].abs().max() < 1e-30


def test_log_odds_excess_is_zero_inside_the_bound_and_quadratic_outside() -> None:
    from vlpretrain.lavit.selector import log_odds_excess

    log_odds = torch.tensor([-300.0, -8.0, -0.5, 0.0, 7.0, 6.0])
    logp = torch.stack([torch.nn.functional.logsigmoid(log_odds), torch.nn.functional.logsigmoid(-log_odds)], -1)
    torch.testing.assert_close(log_odds_excess(logp[None], 6.0)[0], torch.tensor([294.0**2, 4.0, 0, 0, 1.0, 0]))


@pytest.mark.parametrize("bound", [0.0, 6.0])
def test_a_saturated_selector_is_pulled_back_only_with_a_log_odds_bound(images, bound: float) -> None:
    tok = tiny(keep_log_odds_bound=bound).train()
    with torch.no_grad():  # every patch pushed to "drop" with log-odds about -80, as in the runs that died
        tok.token_predictor.out_conv[-2].bias.copy_(torch.tensor([-40.0, 40.0]))
    torch.manual_seed(0)
    out = tok.forward_features(tok.encoder(images).detach())
    assert out.keep_ratio == 0
    out.loss_B.mean().backward()
    keep_bias_grad = tok.token_predictor.out_conv[-2].bias.grad[0]
    if bound:
        assert keep_bias_grad < -1.0  # a descent step raises the keep logit
    else:
        assert keep_bias_grad.abs() < 1e-6  # nothing brings the selector back


def test_tokenize_then_decode(images) -> None:
    tok = tiny().eval()
    ids, keep = tok.tokenize(images)
    assert [len(s) for s in ids] == keep.sum(1).tolist()
    assert all(s.dtype == torch.long and (s.numel() == 0 or s.max() < 64) for s in ids)
    feats = tok.decode_codes(ids)
    assert feats.shape == (6, tok.num_patches, tok.encoder.dim) and torch.isfinite(feats).all()
    ids2, _ = tok.tokenize(images)
    assert all(torch.equal(a, b) for a, b in zip(ids, ids2, strict=True))  # deterministic by default


def test_tokenize_features_keeps_the_intermediates_of_tokenize(images) -> None:
    tok = tiny().eval()
    ids, keep = tok.tokenize(images)
    out = tok.tokenize_features(tok.encoder(images))
    assert torch.equal(out.keep_BN, keep) and out.keep_BN.dtype == torch.bool
    assert all(torch.equal(a, b) for a, b in zip(ids, out.ids_and_keep()[0], strict=True))
    assert out.valid_BK.sum(1).tolist() == keep.sum(1).tolist()  # valid rows: a prefix of K_b per image
    assert torch.equal(out.ids_BK, tok.quantize.encode(out.z_BKC))
    assert out.merged_BKD.shape[:2] == out.z_BKC.shape[:2] == out.valid_BK.shape


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


def test_policy_decoder_equals_the_decoder_on_kept_rows(images) -> None:
    """Training decodes all rows with the keep mask as policy: with a hard mask that is the kept-rows decoder."""
    tok = tiny().eval()
    torch.manual_seed(1)
    codes = torch.nn.functional.normalize(torch.randn(6, tok.num_patches, 32), dim=-1)
    keep = (torch.rand(6, tok.num_patches) < 0.4).float()
    keep[0] = 1.0  # everything kept
    keep[1, :5] = 0.0
    from vlpretrain.lavit.merger import gather_rows, kept_index

    index, valid = kept_index(keep)
    reference = tok.decoder(gather_rows(codes, index), valid)
    torch.testing.assert_close(tok.decoder.forward_policy(codes, keep), reference, atol=2e-4, rtol=1e-4)


def test_policy_decoder_gives_every_keep_decision_a_gradient(images) -> None:
    tok = tiny().train()
    x = tok.encoder(images)
    logp = tok.token_predictor(x).detach().requires_grad_(True)
    from vlpretrain.lavit.selector import keep_decision

    keep = keep_decision(logp, "gumbel")
    z = tok.encode_task_layer(tok.causal_encoder.forward_dense(x, keep))
    rec = tok.decoder.forward_policy(torch.nn.functional.normalize(z, dim=-1), keep)
    (1 - torch.nn.functional.cosine_similarity(rec, x, dim=-1)).mean().backward()
    grad = logp.grad[..., 0]
    assert (grad[keep.bool()] != 0).float().mean() > 0.9 and (grad[~keep.bool()] != 0).float().mean() > 0.9


def test_deterministic_threshold_calibrates_to_the_target_ratio(images) -> None:
    tok = tiny(rho=0.3).train()
    x = tok.encoder(images)
    with torch.no_grad():  # a selector whose p_keep is at most ~0.4: p > 0.5 would keep nothing
        last = tok.token_predictor.out_conv[-2]
        last.weight.mul_(300.0)
        logp = tok.token_predictor(x)
        last.bias.sub_(torch.stack([(logp[..., 0] - logp[..., 1]).max() + 0.4, torch.tensor(0.0)]))
    assert tok.eval().keep_mask(x).sum() == 0
    tok.train()
    for _ in range(300):
        sampled = tok.keep_mask(x).mean()
    kept = tok.eval().keep_mask(x).mean()
    assert float(sampled) < 0.4 and abs(float(kept) - 0.3) < 0.05
    assert float(tok.token_predictor.keep_threshold) < 0  # below p = 0.5
    frozen = tiny(calibrate_threshold=False).train()
    frozen.keep_mask(x)
    assert float(frozen.token_predictor.keep_threshold) == 0.0


def test_fan_in_decoder_gives_codes_and_positions_the_same_scale() -> None:
    """Unit-norm codes through ``in_proj`` have unit element variance, like the rank positions they are added to
    (with N(0, 1/C) weights the code content would be a fifth of the positional signal at C = 32)."""
    from vlpretrain.lavit.feature_decoder import FeatureDecoder

    torch.manual_seed(0)
    dec = FeatureDecoder(32, 256, 1, 4, 512, 64, 256, 64)
    dec.init_weights("fan_in")
    codes = torch.nn.functional.normalize(torch.randn(512, 32), dim=-1)
    content = dec.in_proj(codes) - dec.in_proj.bias
    assert 0.8 < float(content.var()) < 1.25 and 0.8 < float(dec.pos_embed.var()) < 1.25
    dec.init_weights("official")
    assert float(dec.pos_embed.std()) < 0.05


def test_ratio_multiplier_rises_while_too_much_is_kept_and_its_term_pushes_keep_down(images) -> None:
    """With ``ratio_dual_lr`` the multiplier moves by lr x (kept fraction - rho) per training forward, and the loss
    gains multiplier x (kept - rho): with everything kept the term is positive and pushes the keep logit down."""
    import copy

    assert "ratio_multiplier" not in tiny().state_dict()  # off: checkpoints keep their keys
    torch.manual_seed(0)  # no quantiser in these calls, so two copies compute the same reconstruction
    tok = DynamicTokenizer(TokenizerConfig(codebook_size=64, quant_warmup_steps=100, ratio_dual_lr=0.5)).train()
    with torch.no_grad():  # keep nearly every patch: log-odds about +20
        tok.token_predictor.out_conv[-2].bias.copy_(torch.tensor([10.0, -10.0]))
    features = tok.encoder(images).detach()
    first = tok.forward_features(features)
    gap = 1 - 1 / 3
    assert float(first.keep_ratio) == 1.0 and float(tok.ratio_multiplier) == pytest.approx(0.5 * gap)
    plain = copy.deepcopy(tok)
    plain.cfg = TokenizerConfig(**{**vars(tok.cfg), "ratio_dual_lr": 0.0})
    with_term = tok.forward_features(features).loss_B.mean()
    without = plain.forward_features(features).loss_B.mean()
    assert float((with_term - without).detach()) == pytest.approx(0.5 * gap * gap, rel=1e-4)
    with_term.backward()  # the multiplier's in-place step must not break the backward pass
    assert tok.token_predictor.out_conv[-2].bias.grad is not None
    assert float(tok.ratio_multiplier) == pytest.approx(2 * 0.5 * gap)
    with torch.no_grad():  # now keep nearly nothing: the multiplier falls
        tok.token_predictor.out_conv[-2].bias.copy_(torch.tensor([-10.0, 10.0]))
    before = float(tok.ratio_multiplier)
    tok.forward_features(features)
    assert float(tok.ratio_multiplier) == pytest.approx(before - 0.5 / 3)
    assert "ratio_multiplier" in tok.state_dict()  # saved, so a resumed run continues with it


def test_random_keep_steps_ignore_the_selector_then_hand_over(images) -> None:
    """For the first ``random_keep_steps`` training calls every patch is kept with probability rho whatever the
    selector says (and the selector gets no gradient); then the selector's decisions take over; evaluation always
    uses the selector."""
    tok = tiny(random_keep_steps=2, rho=0.5).train()
    with torch.no_grad():  # a selector that drops every patch
        tok.token_predictor.out_conv[-2].bias.copy_(torch.tensor([-40.0, 40.0]))
    x = tok.encoder(images).detach()
    torch.manual_seed(0)
    for _ in range(2):
        out = tok.forward_features(x)
        assert 0.4 < out.keep_ratio < 0.6
        out.loss_B.mean().backward()
        grads = [p.grad for p in tok.token_predictor.parameters()]
        assert all(g is None or not g.any() for g in grads)
    assert tok.forward_features(x).keep_ratio == 0
    assert tok.eval().tokenize_features(x).keep_BN.sum() == 0
