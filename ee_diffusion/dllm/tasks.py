"""The toy tasks of the shipped masked diffusion LMs, as fresh random problems.

`tiny-mdlm` knows two tasks with one answer each, which it writes in a single pass: `addition` and `sorting`.
`tiny-mdlm-puzzles` knows two on which decoding has to settle the answer gradually: `permutation` and `digitsum`
have many valid answers, and committing every position at once lets the positions pick incompatible ones.
`longadd` (6-digit addition, carries) was part of its first training stage and is not learnt (see its card).

torch is imported when the first problem is drawn, so the CLI can list `TASKS` without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

TASKS = ("addition", "sorting", "permutation", "digitsum", "longadd")


@dataclass(frozen=True)
class Problem:
    """One problem: the prompt the model sees and one correct answer text (without EOS), the training target."""

    task: str
    prompt: str
    answer: str

    def is_correct(self, text: str) -> bool:
        """Whether `text` (surrounding whitespace ignored) answers the problem: equal to `answer` where the answer is
        unique; for `permutation` any arrangement of the given digits, for `digitsum` any number with the stated
        number of digits (no leading zero) and digit sum."""
        text = text.strip()
        if self.task == "permutation":
            return sorted(text) == sorted(self.prompt.removeprefix("perm:").removesuffix("="))
        if self.task == "digitsum":
            length, total = map(int, self.prompt.removeprefix("dsum:").removesuffix("=").split(","))
            return (
                len(text) == length
                and text.isdigit()
                and (length == 1 or text[0] != "0")
                and sum(map(int, text)) == total
            )
        return text == self.answer


def _randint(low: int, high: int, count: int, generator: torch.Generator) -> list[int]:
    """`count` integers drawn uniformly from `[low, high)`."""
    import torch

    return torch.randint(low, high, (count,), generator=generator).tolist()


def _integer(generator: torch.Generator, min_digits: int, max_digits: int) -> int:
    """A number whose count of digits is uniform in `[min_digits, max_digits]`, then uniform among those."""
    (num_digits,) = _randint(min_digits, max_digits + 1, 1, generator)
    low = 0 if num_digits == 1 else 10 ** (num_digits - 1)
    return _randint(low, 10**num_digits, 1, generator)[0]


def make_problem(task: str, generator: torch.Generator) -> Problem:
    """Draw one problem.

    Args:
        task: One of `TASKS`:
            - `"addition"`: `"{a}+{b}="`, a and b of 1 to 4 digits (each length equally likely), answer the sum;
            - `"sorting"`: `"sort:{digits}="` with 4 to 16 digits, answer the digits in ascending order;
            - `"permutation"`: `"perm:{digits}="` with 4 to 10 digits, answer any arrangement of them (the target
              drawn here is a uniformly random one);
            - `"digitsum"`: `"dsum:{n},{s}="`, answer any n-digit number (n from 2 to 5, no leading zero) whose
              digits sum to s (the target is a uniformly random n-digit number, s its digit sum);
            - `"longadd"`: `"{a}+{b}="`, a and b of 6 digits, answer the sum (carry chains up to 6 long).
        generator: Source of randomness.
    """
    if task == "addition":
        a, b = _integer(generator, 1, 4), _integer(generator, 1, 4)
        return Problem(task, f"{a}+{b}=", str(a + b))
    if task == "longadd":
        a, b = _integer(generator, 6, 6), _integer(generator, 6, 6)
        return Problem(task, f"{a}+{b}=", str(a + b))
    if task == "sorting":
        (count,) = _randint(4, 17, 1, generator)
        digits = _randint(0, 10, count, generator)
        return Problem(task, "sort:" + "".join(map(str, digits)) + "=", "".join(map(str, sorted(digits))))
    if task == "permutation":
        import torch

        (count,) = _randint(4, 11, 1, generator)
        digits = _randint(0, 10, count, generator)
        order = torch.randperm(count, generator=generator).tolist()
        return Problem(task, "perm:" + "".join(map(str, digits)) + "=", "".join(str(digits[i]) for i in order))
    if task == "digitsum":
        number = str(_integer(generator, 2, 5))
        return Problem(task, f"dsum:{len(number)},{sum(map(int, number))}=", number)
    raise ValueError(f"Unknown task {task!r}; expected one of {TASKS}.")


def make_problems(task: str, count: int, seed: int = 0) -> list[Problem]:
    """`count` fresh problems of `task`, reproducible from `seed`."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return [make_problem(task, generator) for _ in range(count)]


def accuracy(problems: list[Problem], texts: list[str]) -> float:
    """Fraction of `texts` that answer their problem (`Problem.is_correct`)."""
    if len(problems) != len(texts):
        raise ValueError(f"Got {len(problems)} problems but {len(texts)} texts.")
    return sum(p.is_correct(t) for p, t in zip(problems, texts)) / max(len(problems), 1)
