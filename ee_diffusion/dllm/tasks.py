"""The two toy tasks of the shipped `tiny-mdlm`: addition and digit sorting, as fresh random problems.

torch is imported when the first problem is drawn, so the CLI can list `TASKS` without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

TASKS = ("addition", "sorting")


@dataclass(frozen=True)
class Problem:
    """One problem: the prompt the model sees and the exact answer text it must produce (without EOS)."""

    task: str
    prompt: str
    answer: str


def _randint(low: int, high: int, count: int, generator: torch.Generator) -> list[int]:
    """`count` integers drawn uniformly from `[low, high)`."""
    import torch

    return torch.randint(low, high, (count,), generator=generator).tolist()


def _integer(generator: torch.Generator, max_digits: int) -> int:
    (num_digits,) = _randint(1, max_digits + 1, 1, generator)
    low = 0 if num_digits == 1 else 10 ** (num_digits - 1)
    return _randint(low, 10**num_digits, 1, generator)[0]


def make_problem(task: str, generator: torch.Generator) -> Problem:
    """Draw one problem.

    Args:
        task: `"addition"` (`"{a}+{b}="`, a and b of 1 to 4 digits, each length equally likely) or `"sorting"`
            (`"sort:{digits}="` with 4 to 16 digits; the answer is the digits in ascending order).
        generator: Source of randomness.
    """
    if task == "addition":
        a, b = _integer(generator, 4), _integer(generator, 4)
        return Problem(task, f"{a}+{b}=", str(a + b))
    if task == "sorting":
        (count,) = _randint(4, 17, 1, generator)
        digits = _randint(0, 10, count, generator)
        return Problem(task, "sort:" + "".join(map(str, digits)) + "=", "".join(map(str, sorted(digits))))
    raise ValueError(f"Unknown task {task!r}; expected one of {TASKS}.")


def make_problems(task: str, count: int, seed: int = 0) -> list[Problem]:
    """`count` fresh problems of `task`, reproducible from `seed`."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return [make_problem(task, generator) for _ in range(count)]


def exact_match(problems: list[Problem], texts: list[str]) -> float:
    """Fraction of `texts` equal to their problem's answer (surrounding whitespace ignored)."""
    if len(problems) != len(texts):
        raise ValueError(f"Got {len(problems)} problems but {len(texts)} texts.")
    return sum(p.answer == t.strip() for p, t in zip(problems, texts)) / max(len(problems), 1)
