"""`ee-diffusion dllm-bench`: accuracy, NFE and speed of decoding methods on fresh toy problems, and each early-commit
rule's accuracy-vs-NFE front over its threshold.

Every method decodes the same problems (greedy, batched) with the same pipeline; timings come from whole passes
over the problem set, interleaved across methods; `speedup` is the median over the rounds of `full`'s time over the
method's (each ratio between runs made next to each other). `qps = speedup * retention ** gamma` (SchED's
quality-penalised speedup, gamma 4). With `repeats=0` nothing is timed (a threshold sweep needs only accuracy and
NFE) and the timing columns are empty.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass

import torch

from ..metrics.throughput import round_speedups, time_interleaved
from ..outputs import staged_file
from .methods import Method, method_settings, parse_method
from .tasks import Problem, accuracy, make_problems

GAMMA = 4
RETENTION_TARGET = 0.99  # what `best_rows` asks of a setting


@dataclass(frozen=True)
class BenchRow:
    method: str
    name: str
    value: float | None
    cache: str | None
    task: str
    accuracy: float
    retention: float | None  # None where full decoding solved nothing: no share of it to keep
    nfe: float
    nfe_median: float
    nfe_reduction: float
    tokens_per_s: float | None
    speedup: float | None
    qps: float | None


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
        tasks: Task names (`TASKS`).
        methods: Method specs, `NAME[:VALUE][+CACHE]` (see `methods.py`); checked before anything runs.
        num_problems: Fresh problems per task (drawn from `seed`, never seen in training).
        batch_size: Prompts per pipeline call.
        repeats, warmup: Timed and untimed interleaved passes over the problems; `repeats=0` times nothing and
            decodes each method once.
    """
    parsed = {m.label: m for m in map(parse_method, methods)}
    parsed = {"full": Method("full"), **parsed}
    steps, gen_length = pipe.config.steps, pipe.config.gen_length
    rows = []
    for task in tasks:
        problems = make_problems(task, num_problems, seed=seed)
        results: dict[str, tuple[list[str], torch.Tensor]] = {}
        runs = {}
        for label, method in parsed.items():
            settings = method_settings(method, steps)
            runs[label] = lambda label=label, settings=settings, results=results, problems=problems: (
                results.__setitem__(label, _decode_all(pipe, problems, batch_size, settings))
            )
        if repeats:
            timings = time_interleaved(runs, repeats=repeats, warmup=warmup)
        else:
            timings = None
            for run in runs.values():
                run()
        base_accuracy = accuracy(problems, results["full"][0])
        base_nfe = float(results["full"][1].float().mean())
        for label, method in parsed.items():
            texts, nfe = results[label]
            score = accuracy(problems, texts)
            retention = score / base_accuracy if base_accuracy else None
            speedup = None if timings is None else statistics.median(round_speedups(timings["full"], timings[label]))
            rows.append(
                BenchRow(
                    method=label,
                    name=method.name,
                    value=method.value,
                    cache=method.cache,
                    task=task,
                    accuracy=score,
                    retention=retention,
                    nfe=float(nfe.float().mean()),
                    nfe_median=float(nfe.float().median()),
                    nfe_reduction=base_nfe / float(nfe.float().mean()),
                    tokens_per_s=None if timings is None else num_problems * gen_length / timings[label].median,
                    speedup=speedup,
                    qps=None if speedup is None or retention is None else speedup * retention**GAMMA,
                )
            )
    return rows


def _number(value: float | None, form: str) -> str:
    return "-" if value is None else format(value, form)


def format_rows(rows: list[BenchRow]) -> str:
    """A Markdown table of the rows."""
    lines = [
        "| task | method | accuracy | retention | NFE (mean / median) | NFE cut | tokens/s | speedup | QPS (gamma 4) "
        "|",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r.task} | {r.method} | {r.accuracy:.3f} | {_number(r.retention, '.3f')} | "
            f"{r.nfe:.2f} / {r.nfe_median:g} | "
            f"{r.nfe_reduction:.2f}x | {_number(r.tokens_per_s, '.0f')} | {_number(r.speedup, '.2f')}"
            f"{'' if r.speedup is None else 'x'} | {_number(r.qps, '.2f')} |"
        )
    return "\n".join(lines)


def front(rows: list[BenchRow]) -> list[BenchRow]:
    """The rows no other row beats on both axes (at most the NFE and at least the accuracy, one of them strictly),
    by increasing NFE."""
    ordered = sorted(rows, key=lambda r: (r.nfe, -r.accuracy))
    kept: list[BenchRow] = []
    for row in ordered:
        if not kept or row.accuracy > kept[-1].accuracy:
            kept.append(row)
    return kept


def best_rows(rows: list[BenchRow], target: float = RETENTION_TARGET) -> list[BenchRow]:
    """Per task and method family (name and cache), the setting with the fewest NFE whose retention is at least
    `target` (families with none are left out)."""
    best: dict[tuple, BenchRow] = {}
    for row in rows:
        key = (row.task, row.name, row.cache)
        if row.retention is not None and row.retention >= target and (key not in best or row.nfe < best[key].nfe):
            best[key] = row
    return list(best.values())


def format_fronts(rows: list[BenchRow]) -> str:
    """Per task and rule, the swept settings as `value -> accuracy @ NFE`, those off the rule's front in brackets."""
    lines = [
        "| task | rule | threshold -> accuracy @ NFE (in brackets: off the rule's front) |",
        "| --- | --- | --- |",
    ]
    families: dict[tuple, list[BenchRow]] = {}
    for row in rows:
        if row.value is not None:
            families.setdefault((row.task, row.name, row.cache), []).append(row)
    for (task, name, cache), members in families.items():
        on_front = {id(r) for r in front(members)}
        cells = [
            (
                f"{r.value:g} -> {r.accuracy:.3f} @ {r.nfe:.2f}"
                if id(r) in on_front
                else f"({r.value:g} -> {r.accuracy:.3f} @ {r.nfe:.2f})"
            )
            for r in sorted(members, key=lambda r: r.value)
        ]
        lines.append(f"| {task} | {name}{'' if cache is None else '+' + cache} | {'; '.join(cells)} |")
    return "\n".join(lines)


def plot_fronts(path: str, rows: list[BenchRow]) -> None:
    """Accuracy against mean NFE, one panel per task: each rule's swept settings as a line (front points filled),
    the other methods as single markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r.task for r in rows))
    figure, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.2), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        families: dict[str, list[BenchRow]] = {}
        for row in (r for r in rows if r.task == task):
            key = row.name if row.value is not None else row.method
            families.setdefault(key + ("" if row.cache is None else "+" + row.cache), []).append(row)
        for label, members in families.items():
            members = sorted(members, key=lambda r: r.nfe)
            line = axis.plot(
                [r.nfe for r in members],
                [r.accuracy for r in members],
                marker="o",
                markersize=3,
                linestyle="-" if len(members) > 1 else "none",
                label=label,
            )[0]
            best = front(members)
            axis.plot([r.nfe for r in best], [r.accuracy for r in best], "o", color=line.get_color(), markersize=6)
        axis.set(title=task, xlabel="denoiser passes per problem (mean NFE)", ylabel="accuracy")
        axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    with staged_file(path) as staged:
        figure.savefig(staged, dpi=120)
    plt.close(figure)


def write_json(path: str, rows: list[BenchRow]) -> None:
    """The rows as a JSON list (`rows_as_dicts`), written whole and then put in place."""
    with staged_file(path) as staged:
        staged.write_text(json.dumps(rows_as_dicts(rows), indent=2))


def rows_as_dicts(rows: list[BenchRow]) -> list[dict]:
    return [asdict(r) for r in rows]
