"""Text tokenizers: a local HF tokenizer folder for real runs, or one trained here on the run's own text.

The built-in shapes-world tokenizer is a word-level vocabulary (words and punctuation) trained with the `tokenizers`
library on text from the shapes-world generator, so it covers every word the data can contain. Special tokens:
``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2, ``<unk>`` = 3. ``"shapes-world-lm"`` (LaVIT's unified LM) adds the words of
LaVIT's prompt formats ("Question: ... Answer:") and lower-cases its input, so prompts in any case stay in vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
# Words of LaVIT's prompt formats that shapes-world text never contains.
PROMPT_TEXTS = ["question: answer:"]


def train_word_tokenizer(
    texts: Iterable[str], min_frequency: int = 1, lowercase_inputs: bool = False
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``texts`` (lower-cased words and punctuation marks).

    ``lowercase_inputs`` also lower-cases what it encodes (else upper-case words are ``<unk>``).
    """
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    if lowercase_inputs:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIALS, min_frequency=min_frequency)
    tok.train_from_iterator((t.lower() for t in texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")  # fmt: skip


def shapes_world_texts(n: int = 3000, seed: int = 0) -> list[str]:
    """Captions, questions and answers of ``n`` sampled scenes plus the document sentences (no pixels drawn):
    enough to see every word of the shapes-world grammar."""
    from vlpretrain.data import synthetic as sw

    cfg = sw.SynthConfig(seed=seed)
    texts = [sw.DOC_INTRO, *sw.DOC_FILLERS]
    for i in range(n):
        rng = sw.example_rng(seed, "train", i, tag="vocab")
        scene = sw.sample_scene(cfg, "train", i, rng)
        texts.append(sw.make_caption(scene, rng))
        texts.extend(f"{qa['question']} {qa['answer']}" for qa in sw.make_qa(scene, rng))
    return texts


def load_text_tokenizer(spec: str) -> PreTrainedTokenizerFast:
    """``"shapes-world"`` (or ``"shapes-world-lm"``) for a built-in word-level tokenizer, else a local HF folder."""
    if spec == "shapes-world":
        return train_word_tokenizer(shapes_world_texts())
    if spec == "shapes-world-lm":
        return train_word_tokenizer(shapes_world_texts() + PROMPT_TEXTS, lowercase_inputs=True)
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer: {spec} is neither 'shapes-world', 'shapes-world-lm' nor a local tokenizer folder"
        )
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
