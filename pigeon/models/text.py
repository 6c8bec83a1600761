"""The tiny backbone's caption tokenizer: a word-level ``tokenizers`` model built from the captions.

Words are lower-cased and split on whitespace and punctuation; ``[PAD]`` = 0, ``[BOS]`` = 1,
``[UNK]`` = 2, then the words in sorted order (a deterministic vocabulary). Wrapped as a
transformers ``PreTrainedTokenizerFast`` that left-pads and prepends ``[BOS]``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

from pigeon.errors import CheckpointError

PAD, BOS, UNK = "[PAD]", "[BOS]", "[UNK]"
SPECIALS = (PAD, BOS, UNK)


def _normalizer():
    return normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])


def caption_words(captions: Iterable[str]) -> list[str]:
    """The sorted distinct words of the captions, as the tokenizer splits them."""
    norm, split = _normalizer(), pre_tokenizers.Whitespace()
    words: set[str] = set()
    for caption in captions:
        words.update(w for w, _ in split.pre_tokenize_str(norm.normalize_str(str(caption))))
    return sorted(words - set(SPECIALS))


def build_caption_tokenizer(captions: Iterable[str]) -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for word in caption_words(captions):
        vocab[word] = len(vocab)
    core = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = _normalizer()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    return _wrap(core)


def _wrap(core: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, pad_token=PAD, unk_token=UNK, padding_side="left"
    )


def save_caption_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))


def load_caption_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: caption tokenizer missing")
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # the library raises several types for a broken folder
        reason = f"{type(exc).__name__}: {exc}"
        raise CheckpointError(f"{folder}: cannot load caption tokenizer ({reason})") from exc
    tokenizer.padding_side = "left"
    return tokenizer
