"""The documentation holds in a fresh clone: its commands parse, its links resolve, the files it cites exist.

The rules, for README.md, docs/*.md, comfyui/README.md and the model cards (ee_diffusion/assets/**/README.md):

1. Commands. A line of a fenced code block that starts (after an optional `$ ` prompt and `NAME=value`
   environment assignments) with `ee-diffusion`, `accelerate launch ... -m ee_diffusion.cli` or `python app.py` is a
   command: `\\` continuations are joined, `$VAR` and `${VAR}` are replaced by a `VAR=value` line earlier in the same
   block, a `#` starts a comment. It is parsed, never run, by the command's own parser (`ee_diffusion.cli.
   build_parser()`, `app.build_parser()`); argparse's exit fails the test, naming the file, the line and the command.
   The parse runs in a copy of the clone: a temporary folder linking the top-level entries a fresh clone has, in
   which the inputs that earlier commands on the same page write (rule 3) stand in as folders or files, and so do the
   files a page says are the reader's own (`<!-- docs-test: reader's files: PATH ... -->` on the line before the
   block). `--device cuda` parses as if a GPU were there.
2. Links. Every relative link and image `[text](path)` outside code resolves to a file or folder of a fresh clone;
   a `#anchor` matches a heading of the target (GitHub's slugs).
3. Inputs. The local paths a command reads (`--model`, `--init-from`, `--reference`, `--inception-path`,
   `--schedule`, and the folders of `ase:<folder>` and `finetuned:<model>:<folder>` methods) are in a fresh clone or
   written by an earlier command on the same page: one whose `--out`, `--output-dir`, `--json`, `--csv`, `--plot` or
   `--save-images` is that path or a folder above it. A path is local when it starts with `./`, `../` or `/`, or with
   a top-level folder of the clone or `out/`; a shipped model's name and a hub id (`owner/name`) are not paths. The
   folder of a `finetuned:` method may also be inside the model's own folder (`finetuned:digits-dit-ase:plans/...`).
4. README.md is at most 300 lines and 25 KB.
5. README.md, docs/*.md, comfyui/README.md and the model cards say nothing about the circumstances in which the work
   was done (which machine was borrowed, sessions, issue numbers, "could not be done here"): `CIRCUMSTANCES`.
   CHANGELOG.md is history and is not checked.
6. Python. A `python` block parses, and every name it reads is a builtin, or bound (imported, assigned, defined) in
   that block or an earlier `python` block of the same page, or one the page says is the reader's own
   (`<!-- docs-test: reader's names: NAME ... -->` on the line before the block); what it imports from `ee_diffusion`
   exists. Nothing else is run.

"A fresh clone" is what git would commit: the files git tracks, and new files git does not ignore (on a clean clone,
in CI, the two are the same); ignored files (`out/`, `.venv/`) never count.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import functools
import importlib
import importlib.util
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = sorted([README, *ROOT.glob("docs/*.md"), ROOT / "comfyui" / "README.md"])
CARDS = sorted([*ROOT.glob("ee_diffusion/assets/*/README.md"), *ROOT.glob("ee_diffusion/assets/*/*/README.md")])

OUTPUT_OPTIONS = ("--out", "--output-dir", "--json", "--csv", "--plot", "--save-images")
INPUT_OPTIONS = ("--model", "--init-from", "--reference", "--inception-path", "--schedule")
METHOD_OPTIONS = ("--methods", "--accelerators")
METHOD_KINDS = ("baseline", "ase", "finetuned", "deediff", "fbcache", "layerskip", "taylorseer", "magcache", "pab")
SCHEDULE_SHAPES = ("linear:", "cosine:", "constant:", "step:")
READERS_FILES = re.compile(r"<!--\s*docs-test:\s*reader's files:(.*?)-->")
READERS_NAMES = re.compile(r"<!--\s*docs-test:\s*reader's names:(.*?)-->")

# Words about how and where the work was done, which belong in no guide (each caught a real sentence once).
CIRCUMSTANCES = [
    r"\blent\b",
    r"\bborrowed\b",
    r"\bsessions?\b",
    r"\b[Ii]ssue \d+",
    r"(?<![\w/&])#\d+\b",
    r"\bnext milestone\b",
    r"\bwill be measured\b",
    r"\b(?:trained|measured|done|run|ran|rerun|tested|downloaded) here\b",
    r"\bfrom here\b",
    r"\bhere on \d",
    r"\bon this machine\b",
    r"\bthis CPU\b",
    r"\bthis project's (?:\d-core )?(?:CPU|machines?)\b",
    r"\bthese (?:virtual )?machines\b",
    r"\bpip is capped\b",
    r"\bdefaults? of then\b",
    r"\bdefault then\b",
    r"\bwas printed before\b",
    r"\bcommand until\b",
    r"\bAn earlier version of\b",
    r"\btime limit of\b",
]


# --- reading the pages -----------------------------------------------------------------------------------------------


@dataclass
class Block:
    """A fenced code block: its language, its lines (fence indentation removed) and where its first line is."""

    language: str
    lines: list[str]
    first_line: int
    readers_files: list[str] = field(default_factory=list)
    readers_names: list[str] = field(default_factory=list)


FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")


def code_blocks(text: str) -> list[Block]:
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, language = opening.group(1), opening.group(2), opening.group(3)
        before = next((line for line in reversed(lines[:i]) if line.strip()), "")
        marker, names = READERS_FILES.search(before), READERS_NAMES.search(before)
        body, j = [], i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        readers_names = names.group(1).split() if names else []
        blocks.append(Block(language, body, i + 2, marker.group(1).split() if marker else [], readers_names))
        i = j + 1
    return blocks


def lines_outside_code(text: str) -> list[str]:
    kept, fence = [], None
    for line in text.splitlines():
        opening = FENCE.match(line)
        if fence is None and opening:
            fence = opening.group(2)
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is None:
            kept.append(line)
    return kept


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans."""
    return re.sub(r"`[^`\n]*`", "", "\n".join(lines_outside_code(text)))


@dataclass
class Command:
    """One documented command: which parser reads it, its arguments, its environment, and the line it starts on."""

    program: str  # "ee-diffusion" or "app"
    argv: list[str]
    env: dict[str, str]
    line: int
    text: str


ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


def commands(block: Block) -> list[Command]:
    found, variables = [], {}
    logical: list[tuple[int, str]] = []
    pending, start = "", 0
    for offset, line in enumerate(block.lines):
        if not pending:
            start = block.first_line + offset
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        logical.append((start, pending + line))
        pending = ""
    if pending:
        logical.append((start, pending))
    for number, line in logical:
        stripped = line.strip().removeprefix("$ ")
        assignment = ASSIGNMENT.match(stripped)
        if assignment:  # `NAME=value` alone on its line defines a variable; `NAME=value command ...` is a command
            with contextlib.suppress(ValueError):
                value = shlex.split(assignment.group(2), comments=True)
                if len(value) <= 1:
                    variables[assignment.group(1)] = value[0] if value else ""
                    continue
        if not re.search(r"(?:^|[\s/])(?:ee-diffusion|accelerate|python3?)\b", stripped):
            continue
        for name, value in variables.items():
            stripped = stripped.replace("${" + name + "}", value).replace("$" + name, value)
        try:
            tokens = shlex.split(stripped, comments=True)
        except ValueError:
            continue
        env = {}
        while tokens and ASSIGNMENT.match(tokens[0]):
            name, value = tokens.pop(0).split("=", 1)
            env[name] = value
        if not tokens:
            continue
        head = tokens[0].rsplit("/", 1)[-1]
        if head == "ee-diffusion":
            found.append(Command("ee-diffusion", tokens[1:], env, number, stripped))
        elif head == "accelerate" and "-m" in tokens and tokens[tokens.index("-m") + 1 :][:1] == ["ee_diffusion.cli"]:
            found.append(Command("ee-diffusion", tokens[tokens.index("-m") + 2 :], env, number, stripped))
        elif re.fullmatch(r"python3?(?:\.\d+)?", head) and tokens[1:2] == ["app.py"]:
            found.append(Command("app", tokens[2:], env, number, stripped))
    return found


def option_values(argv: list[str], names: tuple[str, ...]) -> list[tuple[str, str]]:
    values = []
    for i, token in enumerate(argv):
        name, equals, value = token.partition("=")
        if name in names and equals:
            values.append((name, value))
        elif token in names and i + 1 < len(argv):
            values.append((token, argv[i + 1]))
    return values


def split_methods(text: str) -> list[str]:
    """`--methods` as the bench splits it: a comma starts a new method only before a known kind."""
    methods: list[str] = []
    for piece in text.split(","):
        kind = re.sub(r"@\d+$", "", piece).partition(":")[0]
        if kind in METHOD_KINDS or not methods:
            methods.append(piece)
        else:
            methods[-1] += "," + piece
    return [re.sub(r"@\d+$", "", method) for method in methods]


@dataclass(frozen=True)
class Input:
    """A path a command reads: the option it came from, and the folders it may be relative to."""

    option: str
    path: str
    within: tuple[str, ...] = ()  # a model's folder a `finetuned:` schedule may be inside
    schedule: bool = False  # a schedule folder (holds exit_schedule.json)


def inputs(command: Command) -> list[Input]:
    found = [
        Input(name, value, schedule=name == "--schedule")
        for name, value in option_values(command.argv, INPUT_OPTIONS)
        if not (name == "--schedule" and value.startswith(SCHEDULE_SHAPES))
    ]
    for name, text in option_values(command.argv, METHOD_OPTIONS):
        for method in split_methods(text):
            kind, _, argument = method.partition(":")
            if kind == "ase" and not argument.startswith(SCHEDULE_SHAPES):
                found.append(Input(f"{name} {method}", argument, schedule=True))
            elif kind == "finetuned":
                model, _, schedule = argument.partition(":")
                found.append(Input(f"{name} {method}", model))
                if schedule and not schedule.startswith(SCHEDULE_SHAPES):
                    found.append(Input(f"{name} {method}", schedule, (f"ee_diffusion/assets/{model}", model), True))
    return [found_input for found_input in found if found_input.path]


def outputs(command: Command) -> list[str]:
    return [os.path.normpath(value) for _, value in option_values(command.argv, OUTPUT_OPTIONS)]


# --- what a fresh clone has ------------------------------------------------------------------------------------------


@functools.cache
def clone_files() -> frozenset[str]:
    """The files of a fresh clone (see the module docstring), relative to the repository root."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: what a fresh clone has is unknown")
    return frozenset(path for path in listed.split("\0") if path and (ROOT / path).exists())


@functools.cache
def clone_folders() -> frozenset[str]:
    return frozenset(str(parent) for path in clone_files() for parent in Path(path).parents if str(parent) != ".")


def in_clone(path: str) -> bool:
    path = os.path.normpath(path)
    return path in clone_files() or path in clone_folders()


def is_local(path: str) -> bool:
    first = path.split("/", 1)[0]
    tops = {Path(p).parts[0] for p in clone_files()} | {"out"}
    return path.startswith(("./", "../", "/")) or ("/" in path and first in tops) or path in tops


def produced(path: str, written: list[str]) -> bool:
    path = os.path.normpath(path)
    return any(path == out or path.startswith(out + "/") for out in written)


# --- the parse sandbox -----------------------------------------------------------------------------------------------

SHIPPED_PLAN = ROOT / "ee_diffusion/assets/digits-dit-ase/plans/dpm-solver++-10/exit_schedule.json"


def make_sandbox(folder: Path) -> Path:
    """A folder that looks like a fresh clone's root: links to the top-level entries a clone has, nothing else."""
    folder.mkdir(parents=True, exist_ok=True)
    for top in sorted({Path(path).parts[0] for path in clone_files()}):
        (folder / top).symlink_to(ROOT / top)
    return folder


def stand_in(sandbox: Path, found: Input) -> None:
    """An input that an earlier command writes, as a folder (a schedule folder holds a plan) or an empty file."""
    target = sandbox / found.path
    if target.is_file() or found.path.startswith("/"):
        return
    if Path(found.path).suffix in (".npz", ".pt", ".json", ".png", ".csv") and not found.schedule:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch()
        return
    target.mkdir(parents=True, exist_ok=True)
    if found.schedule and not (target / "exit_schedule.json").exists():
        shutil.copy(SHIPPED_PLAN, target / "exit_schedule.json")


@pytest.fixture
def parse_environment(monkeypatch):
    """A GPU, as far as `--device cuda` is concerned."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    return monkeypatch


def parse(command: Command, monkeypatch) -> str | None:
    """None if the command parses, else argparse's message."""
    with monkeypatch.context() as patch:
        for name, value in command.env.items():
            patch.setenv(name, value)
        if command.program == "app":
            app = importlib.import_module("app")
            if not hasattr(app, "build_parser"):
                pytest.skip("app.py has no build_parser() yet")
            parser = app.build_parser()
        else:
            from ee_diffusion.cli import build_parser

            parser = build_parser()
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                parser.parse_args(command.argv)
        except SystemExit as error:
            if error.code:
                return stderr.getvalue().strip().splitlines()[-1] if stderr.getvalue().strip() else str(error)
    return None


# --- the tests -------------------------------------------------------------------------------------------------------


def relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("page", PAGES + CARDS, ids=relative)
def test_documented_commands_parse_and_their_inputs_exist(page, parse_environment, tmp_path):
    monkeypatch = parse_environment
    sandbox = make_sandbox(tmp_path / "clone")
    monkeypatch.chdir(sandbox)
    if str(ROOT) not in sys.path:
        monkeypatch.syspath_prepend(str(ROOT))
    written: list[str] = []
    problems: list[str] = []
    for block in code_blocks(page.read_text()):
        for readers in block.readers_files:
            stand_in(sandbox, Input("reader's files", readers.rstrip("/")))
        for command in commands(block):
            where = f"{relative(page)}:{command.line}: {command.text}"
            for found in inputs(command) if command.program == "ee-diffusion" else []:
                if found.path in block.readers_files or found.path.rstrip("/") in block.readers_files:
                    stand_in(sandbox, found)  # a plan the reader made reads as one
                    continue
                if produced(found.path, written):
                    stand_in(sandbox, found)
                elif any(in_clone(f"{folder}/{found.path}") for folder in found.within):
                    continue
                elif is_local(found.path) and not in_clone(found.path):
                    problems.append(
                        f"{where}\n    {found.option} {found.path}: not in a fresh clone, and no earlier "
                        "command on this page writes it"
                    )
            error = parse(command, monkeypatch)
            if error:
                problems.append(f"{where}\n    {error}")
            written += outputs(command)
    assert not problems, "\n".join(problems)


def test_the_pages_document_commands():
    """The command test above reads the pages it should: they hold commands of both parsers."""
    found = [command for page in PAGES for block in code_blocks(page.read_text()) for command in commands(block)]
    assert sum(command.program == "ee-diffusion" for command in found) >= 20
    assert any(command.program == "app" for command in found)
    assert any("accelerate" in command.text for command in found)


def github_slug(heading: str) -> str:
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    slugs: dict[str, int] = {}
    found = set()
    for line in lines_outside_code(page.read_text()):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = github_slug(heading.group(1))
            count = slugs.get(slug, 0)
            found.add(slug if count == 0 else f"{slug}-{count}")
            slugs[slug] = count + 1
    return found


LINK = re.compile(r"!?\[(?:[^\]`]|`[^`]*`)*\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")


@pytest.mark.parametrize("page", PAGES, ids=relative)
def test_links_and_images_resolve(page):
    problems = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        try:
            inside = relative(resolved)
        except ValueError:
            problems.append(f"{target}: outside the repository")
            continue
        if path and not in_clone(inside):
            problems.append(f"{target}: {inside} is not in a fresh clone")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{target}: {inside} has no heading #{anchor}")
    assert not problems, f"{relative(page)}:\n" + "\n".join(problems)


def bound_names(tree: ast.AST) -> set[str]:
    """The names a piece of code binds anywhere in it: imports, assignments, definitions and their arguments."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return names


def importable(module: str, name: str) -> bool:
    """Whether `from module import name` works (an attribute, or a submodule of a package)."""
    try:
        return hasattr(importlib.import_module(module), name) or bool(importlib.util.find_spec(f"{module}.{name}"))
    except ImportError:
        return False


def python_problems(text: str) -> list[str]:
    """Rule 6 on a page's text: each problem with its line."""
    known, problems = set(dir(builtins)), []
    for block in code_blocks(text):
        if block.language != "python":
            continue
        try:
            tree = ast.parse("\n".join(block.lines))
        except SyntaxError as error:
            problems.append(f"line {block.first_line + (error.lineno or 1) - 1}: {error.msg}")
            continue
        known |= bound_names(tree) | set(block.readers_names)
        problems += [
            f"line {block.first_line + node.lineno - 1}: {node.module} has no {alias.name!r}"
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "ee_diffusion"
            for alias in node.names
            if not importable(node.module, alias.name)
        ]
        problems += [
            f"line {block.first_line + node.lineno - 1}: {node.id!r} is read but never bound before"
            for node in ast.walk(tree)
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in known
        ]
    return problems


@pytest.mark.parametrize("page", PAGES + CARDS, ids=relative)
def test_python_examples_parse_and_read_only_names_they_bind(page):
    problems = python_problems(page.read_text())
    assert not problems, f"{relative(page)}: " + "; ".join(problems)


def test_the_python_rule_catches_a_name_bound_only_later_a_syntax_error_and_takes_the_readers_names():
    later = "```python\nimages = pipe(steps=found.steps)\n```\n\n```python\nfound = pipe = 1\n```\n"
    assert python_problems(later) == [
        "line 2: 'pipe' is read but never bound before",
        "line 2: 'found' is read but never bound before",
    ]
    assert python_problems("text\n\n```python\nx = (\n```\n") == ["line 4: '(' was never closed"]
    readers = "<!-- docs-test: reader's names: pipe found -->\n" + later
    assert python_problems(readers) == []
    assert python_problems("```python\nfrom a import b\nc = b\n```\n```python\nprint(c)\n```\n") == []
    renamed = "```python\nfrom ee_diffusion import ExitSchedule, ExitPlan\nfrom ee_diffusion.nowhere import x\n```\n"
    assert python_problems(renamed) == [
        "line 2: ee_diffusion has no 'ExitPlan'",
        "line 3: ee_diffusion.nowhere has no 'x'",
    ]


def test_readme_is_a_guide_of_at_most_300_lines_and_25_kb():
    text = README.read_bytes()
    assert len(text.decode().splitlines()) <= 300
    assert len(text) <= 25_000


@pytest.mark.parametrize("page", PAGES + CARDS, ids=relative)
def test_no_words_about_the_circumstances_of_the_work(page):
    text = page.read_text()
    found = [
        f"line {text.count(chr(10), 0, match.start()) + 1}: {match.group(0)!r}"
        for pattern in CIRCUMSTANCES
        for match in re.finditer(pattern, text)
    ]
    assert not found, f"{relative(page)}: " + "; ".join(found)


def test_the_bench_methods_page_lists_what_the_bench_accepts():
    """docs/bench.md shows the method list as `ee-diffusion bench --help` prints it from `METHOD_KINDS`: a renamed,
    added or retired method changes both, or this fails."""
    from ee_diffusion.bench.method_specs import methods_help

    page = (ROOT / "docs" / "bench.md").read_text()
    marker = "<!-- methods: generated from METHOD_KINDS; tests/test_docs.py checks it -->\n```\n"
    assert marker in page
    shown = page.split(marker, 1)[1].split("\n```", 1)[0]
    assert shown == methods_help(), "regenerate the block from ee_diffusion.bench.method_specs.methods_help()"
