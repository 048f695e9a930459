"""The prompts of `digits-flux` and what reads them: a word-level tokenizer over the prompt vocabulary and two tiny
text encoders (a `CLIPTextModel` and a `T5EncoderModel`) built from configs, seeded.

The encoders stay at their random initialisation and are never trained: the Flux transformer learns to read their
outputs (the CLIP encoder's pooled output at the end-of-text token, and the T5 encoder's token sequence). One tokenizer
serves both: `FluxPipeline` calls it with `padding="max_length"`, `max_length`, `truncation` and `return_tensors="pt"`.

One change to the T5 encoder's initialisation: its self-attention output projections are zero, so its layers act on
each token alone. `FluxPipeline` pads the T5 input to `max_sequence_length` (512 by default) and passes no attention
mask; with attention, 500 padding tokens would change every prompt token's output. Without it, the prompt's tokens come
out the same at any length and the padding tokens are identical, which the transformer's training can emulate at any
count (`flow_matching`).
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

from ..data.digits import DIGIT_WORDS

# T5's own special tokens and ids: padding 0, end of text 1, unknown 2.
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
VOCABULARY = (PAD, EOS, UNK, "a", "handwritten", *DIGIT_WORDS)
# Tokens of the text sequence: "a handwritten seven" is 4 with its end-of-text token; the rest is padding.
TEXT_LENGTH = 8
TEXT_HIDDEN_SIZE = 32


def build_word_tokenizer(max_length: int = TEXT_LENGTH) -> PreTrainedTokenizerFast:
    """One token per word of `VOCABULARY` (lower-cased, split at white space and punctuation; any other word is
    `<unk>`), then `</s>`; padded on the right with `<pad>`.

    Args:
        max_length: Its `model_max_length`, which `FluxPipeline` pads the CLIP encoder's input to.
    """
    if max_length < 4:
        raise ValueError(f"`max_length` must hold a prompt and its end-of-text token (at least 4), got {max_length}.")
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(VOCABULARY)}, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, VOCABULARY.index(EOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK, model_max_length=max_length
    )


def build_text_encoders(
    seed: int = 0, hidden_size: int = TEXT_HIDDEN_SIZE, max_length: int = TEXT_LENGTH
) -> tuple[CLIPTextModel, T5EncoderModel]:
    """The tiny CLIP and T5 text encoders (2 layers each, `hidden_size` wide), seeded, in eval mode and frozen.

    The CLIP encoder's pooled output is its last hidden state at the first `</s>` (its `eos_token_id`), so the pooled
    vector has read the whole prompt (CLIP is causal: the padding after it is never read). The T5 encoder's
    self-attention outputs are zeroed (see the module's docstring).
    """
    torch.manual_seed(seed)
    common = dict(vocab_size=len(VOCABULARY), pad_token_id=VOCABULARY.index(PAD), eos_token_id=VOCABULARY.index(EOS))
    clip = CLIPTextModel(
        CLIPTextConfig(
            **common,
            bos_token_id=VOCABULARY.index(PAD),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            projection_dim=hidden_size,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=max_length,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            **common,
            d_model=hidden_size,
            d_kv=hidden_size // 4,
            d_ff=2 * hidden_size,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            decoder_start_token_id=VOCABULARY.index(PAD),
        )
    )
    with torch.no_grad():
        for block in t5.encoder.block:
            block.layer[0].SelfAttention.o.weight.zero_()  # each token's output depends on that token alone
    for encoder in (clip, t5):
        encoder.eval().requires_grad_(False)
    return clip, t5
