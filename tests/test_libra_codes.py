"""Libra's visual codes: lookup-free quantisation, the two-stream id layout, the hybrid input embedding and the
two-stream loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlpretrain.core.llm import LlamaSpec, build_llama
from vlpretrain.libra.loss import libra_loss
from vlpretrain.libra.model import LibraLM
from vlpretrain.libra.sequences import IGNORE
from vlpretrain.libra.visual_codes import (
    HybridImageTokenizer,
    LookupFreeQuantizer,
    VisualCodesConfig,
    bits_to_ids,
    ids_to_bits,
)
from vlpretrain.libra.vocab import VisualVocab


def test_bits_and_ids_are_inverse_most_significant_bit_first() -> None:
    ids = torch.arange(512)
    bits = ids_to_bits(ids, 9)
    assert torch.equal(bits_to_ids(bits), ids)
    first_only = torch.zeros(9, dtype=torch.bool)
    first_only[0] = True
    assert int(bits_to_ids(first_only)) == 256  # the first dimension is the most significant bit


def test_lfq_two_codebooks_of_nine_bits() -> None:
    torch.manual_seed(0)
    lfq = LookupFreeQuantizer(dim=16, num_codebooks=2, bits=9)
    x = torch.randn(3, 5, 16)
    lfq.eval()
    out = lfq(x)
    assert out.ids.shape == (3, 5, 2) and out.ids.min() >= 0 and out.ids.max() < 512
    z = lfq.project_in(x).view(3, 5, 2, 9)
    assert torch.equal(out.ids[..., 0], bits_to_ids(z[..., 0, :] > 0))  # stream 0 = the first 9 dimensions
    assert torch.equal(out.ids[..., 1], bits_to_ids(z[..., 1, :] > 0))
    codes = lfq.ids_to_codes(out.ids, project_out=False)  # the +-1 codes quantise back to the same ids
    assert torch.equal(lfq.codes_to_ids(codes.view(3, 5, 2, 9)), out.ids)
    torch.testing.assert_close(out.quantized, lfq.project_out(codes))
    lfq.train()
    out = lfq(x.requires_grad_())
    assert out.aux_loss.ndim == 0 and torch.isfinite(out.aux_loss)
    (out.quantized.sum() + out.aux_loss).backward()  # straight-through: the input gets a gradient
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_hybrid_tokenizer_codes_and_features() -> None:
    cfg = VisualCodesConfig(layers=[1, 3], quant_dim=8)
    tok = HybridImageTokenizer(cfg).eval()
    images = torch.rand(2, 3, 64, 64)
    out = tok(images)
    assert out.codes_BCN.shape == (2, 2, 64)
    layers = tok.encoder.layer_features(images, [1, 3])
    torch.testing.assert_close(out.features_BNF, torch.cat(layers, dim=-1))  # blocks concatenated, CLS dropped


def test_two_stream_id_layout() -> None:
    vocab = VisualVocab(text_size=32000, codebook_size=512, num_codebooks=2)
    assert (vocab.boi, vocab.eoi, vocab.head_size) == (32512, 32513, 514)
    codes = torch.tensor([[[5, 7, 511], [0, 1, 2]]])  # [B=1, C=2, N=3]
    ids = vocab.image_ids(codes)
    assert ids.shape == (2, 1, 5)
    assert ids[0, 0].tolist() == [32512, 32005, 32007, 32511, 32513]
    assert ids[1, 0].tolist() == [32512, 32000, 32001, 32002, 32513]
    assert vocab.is_visual(ids).all() and not vocab.is_visual(torch.tensor([31999])).any()


def _model() -> LibraLM:
    torch.manual_seed(0)
    lm = build_llama(LlamaSpec(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=2), 20)
    return LibraLM(lm, VisualVocab(20, 8, 2), feature_dim=6)


def test_image_embedding_is_norm_of_concatenation_then_linear() -> None:
    model = _model()
    vocab, side = model.vocab, model.vision
    ids = torch.cat([torch.tensor([[3]]).expand(2, 1), vocab.image_ids(torch.tensor([[[1, 2], [3, 4]]]))[:, 0]], 1)
    feats = torch.randn(1, 5, 6)
    emb = model.embed(ids[:, None], vocab.is_visual(ids[0])[None], feats)
    pos = 2  # the first code position
    cat = torch.cat([side.embed_tokens[0].weight[1], side.embed_tokens[1].weight[3], feats[0, pos]])
    torch.testing.assert_close(emb[0, pos], side.signal_proj(side.signal_norm(cat)))
    torch.testing.assert_close(emb[0, 0], model.lm.model.embed_tokens.weight[3])


def test_loss_is_the_mean_over_streams_of_the_official_combined_softmax() -> None:
    """Officially each stream's logits cover text + image ids with the other modality at -inf, and the loss is the
    mean over the two streams of the token-averaged cross-entropy; ours is that times the target count."""
    model = _model()
    vocab = model.vocab
    image = vocab.image_ids(torch.randint(0, 8, (1, 2, 3)))[:, 0]
    ids = torch.cat([torch.tensor([[1]]).expand(2, 1), image, torch.tensor([[9, 4, 2]]).expand(2, 3)], 1)[:, None]
    labels = ids.clone()
    labels[:, :, [0, 1, 6]] = IGNORE  # <s>, <boi>, the first text token after the image
    out = model(ids, torch.randn(1, ids.shape[-1], 6))
    loss, _ = libra_loss(model, out.hidden_BLH, out.vision_BL, labels)
    h = out.hidden_BLH[0]
    text_full = torch.cat([model.text_logits(h), torch.full((len(h), vocab.head_size), float("-inf"))], -1)
    official = []
    for c in range(2):
        image_full = torch.cat([torch.full((len(h), vocab.text_size), float("-inf")), model.image_logits(h)[c]], -1)
        logits = torch.where(out.vision_BL[0, :, None], image_full, text_full)
        official.append(F.cross_entropy(logits[:-1], labels[c, 0, 1:], ignore_index=IGNORE))
    count = int((labels[0, 0, 1:] != IGNORE).sum())
    torch.testing.assert_close(loss / count, torch.stack(official).mean())
