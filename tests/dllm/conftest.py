"""Tiny models for the dLLM tests: a random BERT masked LM with the char tokenizer, and stand-ins with the calling
conventions of LLaDA, Dream and LLaDA2 (their remote code is not available offline)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ee_diffusion.dllm.tokenizer import build_char_tokenizer
from ee_diffusion.training.mdlm import MDLMTrainConfig, build_model


def tiny_config(**overrides) -> MDLMTrainConfig:
    values = dict(output_dir="", hidden_size=32, num_layers=2, num_heads=2, gen_length=8, max_prompt_length=12)
    return MDLMTrainConfig(**{**values, **overrides})


@pytest.fixture
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture
def tiny_bert(tokenizer):
    torch.manual_seed(0)
    return build_model(tokenizer, tiny_config()).eval()


class ForwardCounter:
    """Counts forward calls and the rows they carry, and keeps the input ids of each call (the decoding trajectory),
    with a plain torch hook (independent of the sampler's nfe)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls, self.rows, self.inputs = 0, 0, []
        module.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        input_ids = args[0] if args else kwargs["input_ids"]
        self.calls += 1
        self.rows += input_ids.shape[0]
        self.inputs.append(input_ids.clone())


class TargetModel(torch.nn.Module):
    """A stand-in denoiser that knows the answer: the logits at answer position j favour `target[j]` by `margin`
    (a transformers-style output with `.logits`). `margin` may be a tensor over answer positions."""

    def __init__(self, target: list[int], vocab_size: int, margin: float | torch.Tensor = 10.0) -> None:
        super().__init__()
        self.target = torch.tensor(target)
        self.vocab_size = vocab_size
        self.margin = torch.as_tensor(margin, dtype=torch.float32)
        self.config = SimpleNamespace(model_type="toy")

    def forward(self, input_ids, attention_mask=None):
        batch, length = input_ids.shape
        logits = torch.zeros(batch, length, self.vocab_size)
        answer = torch.arange(length - len(self.target), length)
        logits[:, answer, self.target] = self.margin
        return SimpleNamespace(logits=logits)


class BidirectionalToy(torch.nn.Module):
    """One bidirectional attention layer without positions (so left padding changes nothing when it is hidden)."""

    def __init__(self, vocab_size: int = 50, hidden: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab_size, hidden)
        self.qkv = torch.nn.Linear(hidden, 3 * hidden)
        self.head = torch.nn.Linear(hidden, vocab_size)

    @property
    def device(self) -> torch.device:  # what diffusers pipelines ask their model for, as of a transformers model
        return self.head.weight.device

    def attend(self, input_ids: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """`keep` `(batch, 1, length, length)` bool (True: may attend), or None for full attention."""
        h = self.embed(input_ids)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        h = h + torch.nn.functional.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], keep)[:, 0]
        return self.head(h)


class LLaDAStandIn(BidirectionalToy):
    """LLaDA's convention: `model(input_ids, attention_bias=None).logits`; an `attention_mask` would make it causal,
    which this stand-in refuses."""

    config = SimpleNamespace(model_type="llada")

    def forward(self, input_ids, attention_mask=None, attention_bias=None):
        if attention_mask is not None:
            raise AssertionError("LLaDA turns causal with an attention_mask")
        return SimpleNamespace(logits=self.attend(input_ids, attention_bias))


class DreamStandIn(BidirectionalToy):
    """Dream's convention: `model(input_ids, attention_mask, tok_idx).logits` with the mask `"full"` or 4-D, and
    logits shifted by one (the prediction for position i comes out at i - 1)."""

    config = SimpleNamespace(model_type="Dream")

    def forward(self, input_ids, attention_mask="full", tok_idx=None):
        if isinstance(attention_mask, str):
            assert attention_mask == "full" and tok_idx is None
            keep = None
        else:
            assert attention_mask.dim() == 4 and tok_idx is not None
            keep = attention_mask
        logits = self.attend(input_ids, keep)
        return SimpleNamespace(logits=torch.cat([logits[:, 1:], logits[:, -1:]], dim=1))


class LLaDA2StandIn(BidirectionalToy):
    """LLaDA2's convention (as diffusers' `LLaDA2Pipeline` calls it): a 2-D `attention_mask` and `position_ids`."""

    config = SimpleNamespace(model_type="llada2_moe")

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        assert attention_mask is not None and attention_mask.dim() == 2 and position_ids is not None
        keep = attention_mask.bool()[:, None, None, :].expand(-1, 1, input_ids.shape[1], -1)
        return SimpleNamespace(logits=self.attend(input_ids, keep))
