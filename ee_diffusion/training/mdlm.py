"""`ee-diffusion train-mdlm`: train a tiny masked diffusion LM (`tiny-mdlm`, `tiny-mdlm-puzzles`) on toy tasks.

The masked-diffusion (MDLM / LLaDA SFT) objective: draw `t ~ U(eps, 1)` per sequence, mask each answer token with
probability `t` (the prompt is never masked), and take the cross-entropy on the masked positions weighted by
`1 / t`, normalised by the number of answer positions.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import BertConfig, BertForMaskedLM, GenerationConfig, PreTrainedTokenizerBase

from ..dllm.adapters import MaskedLMAdapter
from ..dllm.tasks import TASKS, Problem, make_problem
from ..dllm.tokenizer import build_char_tokenizer
from ..outputs import refuse_shipped, staged_file
from .config import MDLMTrainConfig
from .loop import check_same_run, read_checkpoint

logger = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"
# What a resumed run keeps from the run it continues (checked): the model's shape, the optimiser's settings, the seed.
# The steps (and with them the learning-rate schedule), the tasks and the checkpoint interval may change.
RESUMED_AS_IS = (
    "batch_size",
    "learning_rate",
    "warmup_steps",
    "weight_decay",
    "eps",
    "hidden_size",
    "num_layers",
    "num_heads",
    "gen_length",
    "max_prompt_length",
    "seed",
)


def build_model(tokenizer: PreTrainedTokenizerBase, config: MDLMTrainConfig) -> BertForMaskedLM:
    """A small bidirectional BERT masked LM (no dropout, learned absolute positions) for `tokenizer`."""
    bert = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=4 * config.hidden_size,
        max_position_embeddings=config.max_prompt_length + config.gen_length,
        type_vocab_size=1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=tokenizer.pad_token_id,
        mask_token_id=tokenizer.mask_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return BertForMaskedLM(bert)


def encode_problems(
    problems: list[Problem], tokenizer: PreTrainedTokenizerBase, gen_length: int
) -> tuple[torch.LongTensor, torch.LongTensor, int]:
    """Left-padded `prompt + answer + EOS...` rows (the answer padded with EOS to `gen_length`).

    Returns `(input_ids, attention_mask, prompt_length)`; the answer span is `input_ids[:, prompt_length:]`.
    """
    prompts = [tokenizer(p.prompt, add_special_tokens=False)["input_ids"] for p in problems]
    prompt_length = max(map(len, prompts))
    rows, masks = [], []
    for problem, prompt in zip(problems, prompts):
        answer = tokenizer(problem.answer, add_special_tokens=False)["input_ids"]
        if len(answer) >= gen_length:
            raise ValueError(f"Answer {problem.answer!r} needs more than gen_length={gen_length} tokens with its EOS.")
        padding = prompt_length - len(prompt)
        rows.append(
            [tokenizer.pad_token_id] * padding
            + prompt
            + answer
            + [tokenizer.eos_token_id] * (gen_length - len(answer))
        )
        masks.append([0] * padding + [1] * (len(prompt) + gen_length))
    return torch.tensor(rows), torch.tensor(masks), prompt_length


def mdlm_loss(
    adapter: MaskedLMAdapter,
    input_ids: torch.LongTensor,
    attention_mask: torch.LongTensor,
    prompt_length: int,
    generator: torch.Generator | None = None,
    eps: float = 1e-3,
) -> torch.Tensor:
    """The masked-diffusion loss of one batch (see the module docstring)."""
    batch, length = input_ids.shape
    t = (eps + (1.0 - eps) * torch.rand(batch, 1, generator=generator)).to(input_ids.device)
    answer = (torch.arange(length, device=input_ids.device) >= prompt_length).expand(batch, -1)
    masked = answer & (torch.rand(batch, length, generator=generator).to(input_ids.device) < t)
    noisy = torch.where(masked, adapter.mask_token_id, input_ids)
    logits = adapter(noisy, attention_mask)
    token_loss = F.cross_entropy(logits.transpose(1, 2).float(), input_ids, reduction="none")
    return (token_loss * masked / t).sum() / answer.sum()


def _load_start(config: MDLMTrainConfig, tokenizer: PreTrainedTokenizerBase) -> BertForMaskedLM:
    """The model `config.init_from` names, checked to fit the tokenizer and the sequence length."""
    from ..pipelines.loading import resolve_pretrained

    model = BertForMaskedLM.from_pretrained(resolve_pretrained(config.init_from, marker="tokenizer.json"))
    needed = config.max_prompt_length + config.gen_length
    if model.config.vocab_size != len(tokenizer) or model.config.max_position_embeddings < needed:
        raise ValueError(
            f"{config.init_from} has {model.config.vocab_size} tokens and {model.config.max_position_embeddings} "
            f"positions; training needs the character tokenizer's {len(tokenizer)} tokens and {needed} positions."
        )
    return model


def _learning_rate(step: int, config: MDLMTrainConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
    return config.learning_rate * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def save_model(model: BertForMaskedLM, tokenizer: PreTrainedTokenizerBase, config: MDLMTrainConfig, path: str) -> None:
    """Write a transformers folder: model, tokenizer, the default dLLM generation settings and the tasks trained on
    (`tasks` in `generation_config.json`, which `dllm-bench` benchmarks by default)."""
    refuse_shipped(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    GenerationConfig(
        gen_length=config.gen_length,
        steps=config.gen_length,
        block_length=config.gen_length,
        mask_token_id=tokenizer.mask_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tasks=list(dict.fromkeys(config.tasks)),
    ).save_pretrained(path)


def step_seed(seed: int, step: int) -> int:
    """The seed of training step `step`'s problems and masks: a run's data depends on (seed, step) alone."""
    return seed * 1_000_003 + step


class StepBatches(torch.utils.data.Dataset):
    """Item `step` is that step's batch, `(input_ids, attention_mask, prompt_length, seed)`, drawn from
    `step_seed(config.seed, step)`. Being a function of the step, it is the same in any DataLoader worker and after a
    resume, so workers only make problem generation (Python) run beside the model's steps."""

    def __init__(self, config: MDLMTrainConfig, tokenizer: PreTrainedTokenizerBase):
        self.config, self.tokenizer = config, tokenizer

    def __len__(self) -> int:
        return self.config.steps

    def __getitem__(self, step: int) -> tuple[torch.LongTensor, torch.LongTensor, int, int]:
        seed = step_seed(self.config.seed, step)
        generator = torch.Generator().manual_seed(seed)
        tasks = self.config.tasks
        problems = [make_problem(tasks[i % len(tasks)], generator) for i in range(self.config.batch_size)]
        return (*encode_problems(problems, self.tokenizer, self.config.gen_length), seed)


def resume_state(config: MDLMTrainConfig, device: str | torch.device = "cpu") -> tuple[dict, int]:
    """The training state a resumed run continues (`{output_dir}/checkpoint`) and its step, checked to be the same
    run's (`RESUMED_AS_IS`) and to leave steps to train before `stop_at` (or `steps`); a `ValueError` otherwise."""
    path = Path(config.output_dir) / "checkpoint" / STATE_FILE
    state = read_checkpoint(path, device)
    kept = {key: value for key, value in asdict(config).items() if key in RESUMED_AS_IS}
    check_same_run(path, {key: state["config"].get(key) for key in kept}, kept)
    start = state["step"]
    if config.last_step <= start:
        raise ValueError(f"Nothing to train: the run is at step {start} and would stop at step {config.last_step}.")
    return state, start


def train_mdlm(
    config: MDLMTrainConfig, progress: bool = True, device: str | torch.device = "cpu", workers: int = 0
) -> list[float]:
    """Train (or, with `config.resume`, continue training) a tiny masked diffusion LM; returns the loss of every step
    run.

    Checkpoints (model + optimizer) go to `{output_dir}/checkpoint` every `checkpoint_every` steps; the final model is
    written to `output_dir`. Each step's problems and masks come from its own seed (`step_seed`), drawn on the CPU,
    so the run is the same on any `device` and with any number of `workers` (DataLoader processes that generate the
    problems ahead of the model).
    """
    for task in config.tasks:
        if task not in TASKS:
            raise ValueError(f"Unknown task {task!r}; expected some of {TASKS}.")
    checkpoint = os.path.join(config.output_dir, "checkpoint")
    state, start = resume_state(config, device) if config.resume else (None, 0)
    stop = config.last_step
    tokenizer = build_char_tokenizer()
    torch.manual_seed(config.seed)
    model = build_model(tokenizer, config) if config.init_from is None else _load_start(config, tokenizer)
    model = model.train().to(device)
    adapter = MaskedLMAdapter(model, mask_token_id=tokenizer.mask_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        logger.info("resumed from %s at step %d", checkpoint, start)

    batches = torch.utils.data.DataLoader(
        StepBatches(config, tokenizer), batch_size=None, sampler=range(start, stop), num_workers=workers
    )
    losses: list[float] = []
    began = time.perf_counter()
    bar = tqdm(total=config.steps, initial=start, disable=not progress, desc="train-mdlm")
    for step, (input_ids, attention_mask, prompt_length, seed) in enumerate(batches, start=start):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, config)
        generator = torch.Generator().manual_seed(seed + 2**40)  # the masks' stream, apart from any problems'
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        loss = mdlm_loss(adapter, input_ids, attention_mask, prompt_length, generator, config.eps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        bar.update()
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        done = step + 1
        if done % config.checkpoint_every == 0 or done == stop:
            save_model(model, tokenizer, config, checkpoint)
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
            with staged_file(os.path.join(checkpoint, STATE_FILE)) as staged:  # whole, or the last one stays
                torch.save({**state, "step": done, "config": asdict(config)}, staged)
            window = losses[-config.checkpoint_every :]
            logger.info(
                "step %d: mean loss %.4f over the last %d steps, %.0f s",
                done,
                sum(window) / len(window),
                len(window),
                time.perf_counter() - began,
            )
    bar.close()
    save_model(model.eval(), tokenizer, config, config.output_dir)
    return losses
