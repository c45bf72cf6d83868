"""Libra's routed LLaMA: the text path is HF's bit for bit, routing by gradients, the bridge, parity with a literal
re-statement of the official formulas, and the KV cache."""

from __future__ import annotations

import copy

import pytest
import torch
from libra_reference import randomize_bridges, reference_hidden
from transformers.cache_utils import DynamicCache

from vlpretrain.core.llm import LlamaSpec, build_llama
from vlpretrain.libra.expert import BRIDGES
from vlpretrain.libra.model import LibraLM
from vlpretrain.libra.vocab import VisualVocab

T, K, C, N, F = 40, 16, 2, 6, 12  # text vocabulary, codes per codebook, codebooks, patches, feature size


def make_model(seed: int = 0, bridge_rank: int = 8) -> LibraLM:
    torch.manual_seed(seed)
    lm = build_llama(LlamaSpec(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=2), T)
    return LibraLM(lm, VisualVocab(T, K, C), feature_dim=F, bridge_rank=bridge_rank).eval()


def strengthen(model: LibraLM, scale: float = 8.0) -> None:
    """Experts at N(0, 0.02) in both factors are nearly zero maps; scale them so image positions matter."""
    with torch.no_grad():
        for layer in model.vision.layers:
            for name, module in layer.named_children():
                if name not in BRIDGES and hasattr(module, "weight_A"):
                    module.weight_A.mul_(scale)
                    module.weight_B.mul_(scale)


def mixed_batch(vocab: VisualVocab, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [C, 3, L] with text, an image (at different places per row) and text; features [3, L, F]."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b, before in enumerate((1, 3, 2)):
        text = torch.randint(0, T, (8,), generator=g)
        image = vocab.image_ids(torch.randint(0, K, (1, C, N), generator=g))[:, 0]  # [C, N + 2]
        row = torch.cat([text[:before].expand(C, -1), image, text[before:].expand(C, -1)], dim=1)
        rows.append(row if b != 2 else torch.roll(row, 1, dims=1))
    ids = torch.stack(rows, dim=1)
    return ids, torch.randn(3, ids.shape[-1], F, generator=g)


def test_text_only_input_is_hf_llama_bit_for_bit() -> None:
    model = make_model()
    randomize_bridges(model)  # without images the bridges cannot matter
    base = copy.deepcopy(model.lm)  # an unmodified HF LlamaForCausalLM with the same weights
    ids = torch.randint(0, T, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    for attention_mask in (None, mask):
        ref = base(input_ids=ids, attention_mask=attention_mask).logits
        ours = model.text_logits(model(ids[None].expand(C, -1, -1), None, attention_mask).hidden_BLH)
        assert torch.equal(ref, ours)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = base(input_ids=ids).logits
        ours = model.text_logits(model(ids[None].expand(C, -1, -1)).hidden_BLH)
    assert torch.equal(ref, ours)


def test_matches_literal_reference_on_mixed_inputs() -> None:
    model = make_model()
    strengthen(model)
    randomize_bridges(model)
    ids, feats = mixed_batch(model.vocab)
    mask = torch.ones(ids.shape[1:], dtype=torch.long)
    mask[1, :1] = 0
    for attention_mask in (None, mask):
        ours = model(ids, feats, attention_mask).hidden_BLH
        ref = reference_hidden(model, ids, feats, attention_mask)
        keep = mask.bool() if attention_mask is not None else torch.ones_like(mask, dtype=torch.bool)
        torch.testing.assert_close(ours[keep], ref[keep], atol=2e-5, rtol=1e-4)


def test_bridges_start_as_a_no_op() -> None:
    with_bridge, without = make_model(bridge_rank=8), make_model(bridge_rank=0)
    strengthen(with_bridge)
    state = {k: v for k, v in with_bridge.state_dict().items() if "bridge" not in k}
    without.load_state_dict(state, strict=True)
    for layer in with_bridge.vision.layers:
        assert all(int(torch.count_nonzero(getattr(layer, name).weight_B.detach())) == 0 for name in BRIDGES)
    ids, feats = mixed_batch(with_bridge.vocab)
    out = with_bridge(ids, feats).hidden_BLH
    assert torch.equal(out, without(ids, feats).hidden_BLH)
    out.square().sum().backward()  # B gets a gradient at init (A cannot: B = 0), so training moves the bridge
    bridge = with_bridge.vision.layers[0].k_bridge_on_language
    assert float(bridge.weight_B.grad.abs().sum()) > 0 and float(bridge.weight_A.grad.abs().sum()) == 0


def _grads(model: LibraLM, prefix: str) -> float:
    return sum(float(p.grad.abs().sum()) for n, p in model.named_parameters() if n.startswith(prefix) and
               p.grad is not None)  # fmt: skip


@pytest.mark.parametrize("image_first", [True, False])
def test_routing_by_gradients(image_first: bool) -> None:
    """Image positions never touch text weights and text positions never touch image weights: a loss on the
    positions of one modality (before any position of the other, so attention cannot mix them) gives zero gradient
    to every weight of the other modality, and a non-zero one to its own."""
    model = make_model()
    strengthen(model)
    randomize_bridges(model)
    vocab = model.vocab
    image = vocab.image_ids(torch.randint(0, K, (2, C, N)))
    text = torch.randint(0, T, (2, 7)).expand(C, -1, -1)
    ids = torch.cat([image, text] if image_first else [text, image], dim=-1)
    feats = torch.randn(2, ids.shape[-1], F)
    out = model(ids, feats)
    first = N + 2 if image_first else 7
    hidden = out.hidden_BLH[:, :first]
    logits = model.image_logits(hidden) if image_first else model.text_logits(hidden)
    logits.square().sum().backward()
    own, other = ("vision.", "lm.") if image_first else ("lm.", "vision.")
    assert _grads(model, own) > 0
    assert _grads(model, other) == 0


def test_kv_cache_matches_full_recomputation() -> None:
    model = make_model()
    strengthen(model)
    randomize_bridges(model)
    ids, feats = mixed_batch(model.vocab)
    full = model(ids, feats).hidden_BLH
    cache = DynamicCache(config=model.lm.config)
    chunks = []
    for lo, hi in ((0, 2), (2, 7), (7, 8), (8, ids.shape[-1])):  # the image is split across chunks
        chunks.append(model(ids[..., lo:hi], feats[:, lo:hi], None, cache).hidden_BLH)
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-4)


def test_ids_are_checked() -> None:
    model = make_model()
    ids = torch.randint(0, T, (C, 2, 5))
    ids[1, 0, 2] = (ids[0, 0, 2] + 1) % T
    with pytest.raises(ValueError, match="streams differ"):
        model(ids)
    with pytest.raises(ValueError, match="values must be"):
        model(torch.full((C, 1, 3), model.vocab.eoi + 1))
