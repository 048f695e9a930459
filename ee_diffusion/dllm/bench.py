"""`ee-diffusion dllm-bench`: exact-match accuracy, NFE and speed of decoding methods on fresh toy problems.

Every method decodes the same problems (greedy, batched) with the same pipeline; timings come from whole passes
over the problem set, interleaved across methods, median of the repeats. `speedup` is against `full`, and
`qps = speedup * retention ** gamma` (SchED's quality-penalised speedup, gamma 4).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..metrics.throughput import time_interleaved
from .methods import METHODS, method_settings
from .tasks import Problem, exact_match, make_problems

GAMMA = 4


@dataclass(frozen=True)
class BenchRow:
    method: str
    task: str
    accuracy: float
    retention: float
    nfe: float
    tokens_per_s: float
    speedup: float
    qps: float


def _decode_all(pipe, problems: list[Problem], batch_size: int, settings: dict) -> tuple[list[str], torch.Tensor]:
    texts, nfe = [], []
    for start in range(0, len(problems), batch_size):
        out = pipe(prompt=[p.prompt for p in problems[start : start + batch_size]], **settings)
        texts += out.texts
        nfe.append(out.nfe)
    return texts, torch.cat(nfe)


def run_dllm_bench(
    pipe,
    tasks: list[str],
    methods: list[str],
    num_problems: int = 500,
    batch_size: int = 100,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 1234,
) -> list[BenchRow]:
    """Benchmark `methods` on each task; `full` is always run (it is the baseline).

    Args:
        pipe: A `MaskedDiffusionLMPipeline` whose model stores its generation defaults.
        tasks: Task names (`addition`, `sorting`).
        methods: Method names, from `METHODS`.
        num_problems: Fresh problems per task (drawn from `seed`, never seen in training).
        batch_size: Prompts per pipeline call.
        repeats, warmup: Timed and untimed interleaved passes over the problems.
    """
    for method in methods:
        method_settings(method, 1)
    methods = ["full", *[m for m in methods if m != "full"]]
    steps, gen_length = pipe.config.steps, pipe.config.gen_length
    rows = []
    for task in tasks:
        problems = make_problems(task, num_problems, seed=seed)
        results: dict[str, tuple[list[str], torch.Tensor]] = {}

        def runner(method: str) -> Callable[[], None]:
            settings = method_settings(method, steps)
            return lambda: results.__setitem__(method, _decode_all(pipe, problems, batch_size, settings))

        timings = time_interleaved({m: runner(m) for m in methods}, repeats=repeats, warmup=warmup)
        base_accuracy = exact_match(problems, results["full"][0])
        for method in methods:
            accuracy = exact_match(problems, results[method][0])
            retention = accuracy / base_accuracy if base_accuracy else 0.0
            speedup = timings["full"].median / timings[method].median
            rows.append(
                BenchRow(
                    method=method,
                    task=task,
                    accuracy=accuracy,
                    retention=retention,
                    nfe=float(results[method][1].float().mean()),
                    tokens_per_s=num_problems * gen_length / timings[method].median,
                    speedup=speedup,
                    qps=speedup * retention**GAMMA,
                )
            )
    return rows


def format_rows(rows: list[BenchRow]) -> str:
    """A Markdown table of the rows."""
    lines = [
        "| task | method | accuracy | retention | NFE | tokens/s | speedup | QPS (gamma 4) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r.task} | {r.method} | {r.accuracy:.3f} | {r.retention:.3f} | {r.nfe:.2f} | {r.tokens_per_s:.0f} | "
            f"{r.speedup:.2f}x | {r.qps:.2f} |"
        )
    return "\n".join(lines)


def rows_as_dicts(rows: list[BenchRow]) -> list[dict]:
    return [asdict(r) for r in rows]
