"""Libra's sequences: formats, the official label masking, padding, and filling the codes in."""

from __future__ import annotations

import pytest
import torch

from vlpretrain.libra.sequences import (
    IGNORE,
    Segment,
    assemble,
    caption_prompt,
    caption_sample,
    chat_sample,
    fill_images,
    flatten,
)
from vlpretrain.libra.text import ChatTemplate, load_libra_text_tokenizer, newline_id
from vlpretrain.libra.vocab import VisualVocab

VOCAB = VisualVocab(text_size=50, codebook_size=8, num_codebooks=2)
BOS, EOS, NL, PAD = 1, 2, 49, 0
N = 3


def test_caption_labels_follow_the_official_masking() -> None:
    ids, patch, target = flatten(caption_sample(BOS, NL, [10, 11], EOS), VOCAB, N, BOS)
    assert ids == [BOS, VOCAB.boi, 50, 50, 50, VOCAB.eoi, NL, 10, 11, EOS]
    assert patch == [-1, -1, 0, 1, 2, -1, -1, -1, -1, -1]
    # <s> and <boi> never, the codes and <eoi> yes, the newline (first text token after the image) never
    assert target == [False, False, True, True, True, True, False, True, True, True]


def test_first_text_token_after_an_image_is_masked_even_in_a_target_segment() -> None:
    segments = [Segment([BOS]), Segment(image=True, target=True), Segment([10, 11], target=True)]
    _, _, target = flatten(segments, VOCAB, N, BOS)
    assert target[-2:] == [False, True]


def test_chat_labels_only_the_answers() -> None:
    system, user, assistant = [20, 21], [22, 23], [24, 23]
    rounds = [([30, 31], [40]), ([32], [41, 42])]
    ids, _, target = flatten(chat_sample(BOS, NL, EOS, system, user, assistant, rounds), VOCAB, N, BOS)
    labelled = [i for i, t in zip(ids, target, strict=True) if t]
    assert labelled == [40, EOS, 41, 42, EOS]
    expected = [BOS, *system, *user, VOCAB.boi, 50, 50, 50, VOCAB.eoi, NL, 30, 31, *assistant, 40, EOS, *user, 32,
                *assistant, 41, 42, EOS]  # fmt: skip
    assert ids == expected


def test_assemble_pads_right_for_training_and_left_for_prompts() -> None:
    samples = [caption_sample(BOS, NL, [10], EOS), caption_sample(BOS, NL, [10, 11, 12], EOS)]
    right = assemble(samples, VOCAB, N, max_len=32, pad_id=PAD, bos=BOS)
    assert right.ids_BL.shape == (2, 11)
    assert right.attention_mask_BL[0].tolist() == [1] * 9 + [0, 0] and right.ids_BL[0, -1] == PAD
    assert not right.target_BL[0, 9:].any()
    # per sample: 3 codes + <eoi>, then the caption and </s>
    assert right.num_targets() == int(right.target_BL[:, 1:].sum()) == (3 + 1 + 2) + (3 + 1 + 4)
    left = assemble([caption_prompt(BOS, NL), caption_sample(BOS, NL, [10], EOS)], VOCAB, N, 32, PAD, BOS,
                    left_pad=True)  # fmt: skip
    assert left.attention_mask_BL[0].tolist() == [0, 0] + [1] * 7 and left.ids_BL[0, 2] == BOS


def test_assemble_cuts_text_but_never_an_image() -> None:
    long = caption_sample(BOS, NL, list(range(10, 30)), EOS)
    batch = assemble([long], VOCAB, N, max_len=12, pad_id=PAD, bos=BOS)
    assert batch.ids_BL.shape == (1, 12)
    with pytest.raises(ValueError, match="image ends"):
        assemble([long], VOCAB, N, max_len=5, pad_id=PAD, bos=BOS)


def test_fill_images_writes_codes_in_both_streams_and_features() -> None:
    batch = assemble([caption_sample(BOS, NL, [10], EOS)] * 2, VOCAB, N, 32, PAD, BOS)
    codes = torch.tensor([[[1, 2, 3], [4, 5, 6]], [[7, 0, 1], [2, 3, 4]]])  # [B, C, N]
    feats = torch.randn(2, N, 5)
    ids, features, labels = fill_images(batch, codes, feats, VOCAB)
    assert ids[0, 0, 2:5].tolist() == [51, 52, 53] and ids[1, 0, 2:5].tolist() == [54, 55, 56]
    assert ids[0, 1, 2:5].tolist() == [57, 50, 51]
    assert torch.equal(ids[0, :, 0], ids[1, :, 0])  # text positions are the same in both streams
    torch.testing.assert_close(features[1, 2:5], feats[1])
    assert float(features[:, :2].abs().sum()) == 0 and float(features[:, 5:].abs().sum()) == 0
    assert labels[1, 0, 2:6].tolist() == [54, 55, 56, VOCAB.eoi] and labels[0, 0, 1] == IGNORE


def test_builtin_text_tokenizer_has_a_newline_and_the_template_words() -> None:
    tok = load_libra_text_tokenizer("shapes-world-libra")
    nl = newline_id(tok)
    assert tok("a\nb", add_special_tokens=False).input_ids[1] == nl
    template = ChatTemplate(tok)
    assert tok.unk_token_id not in template.system + template.user + template.assistant
