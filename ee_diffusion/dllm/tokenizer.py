"""A character-level tokenizer that `transformers.AutoTokenizer.from_pretrained` loads from a folder."""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "[PAD]", "mask_token": "[MASK]", "eos_token": "[EOS]", "unk_token": "[UNK]"}
CHARACTERS = string.digits + string.ascii_lowercase + " +-*=:,."


def build_char_tokenizer(characters: str = CHARACTERS) -> PreTrainedTokenizerFast:
    """One token per character, special tokens first (`[PAD]` 0, `[MASK]` 1, `[EOS]` 2, `[UNK]` 3), left padding.

    Args:
        characters: The characters of the vocabulary, in id order after the special tokens.
    """
    if len(set(characters)) != len(characters):
        raise ValueError(f"`characters` must not repeat a character, got {characters!r}.")
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS.values())}
    vocab.update({char: len(SPECIAL_TOKENS) + i for i, char in enumerate(characters)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, padding_side="left", **SPECIAL_TOKENS)
