"""README.md and docs/*.md: every command shown is one mpicaffe accepts, every relative link leads
somewhere, and the README stays short. Nothing shown is run.

Commands come from fenced shell blocks (sh, bash, shell, console: every line; text or unlabelled
blocks: only lines starting with `$ `; python, protobuf and other blocks: none) and from inline
code. A command is what follows `mpicaffe` (`.venv/bin/mpicaffe`, `python -m mpicaffe`, or
after a launcher: `mpirun ... mpicaffe`) up to a shell operator (`&&`, `;`, `|`, mpirun's `:`);
quoted scripts (`sh -c '...'`) are searched too.

- A command in a code block must parse as `mpicaffe` itself parses it: `normalize_argv`, then
  `build_parser().parse_args`; the `train ...` after `mpicaffe launch ... --` parses too.
- Inline code is prose: it may name a flag without its value (`mpicaffe train --snapshot`), leave
  out required arguments, or be a synopsis (`[--level N]`, `TRAIN|TEST`, `...`). It parses with a
  copy of the parser in which nothing is required and no options exclude each other, so the
  subcommand, every flag and every value shown are still checked.
- Flags must be spelled in full (argparse would take a prefix); an upper-case placeholder (`N`,
  `K`, `DIR`) stands for any number. Repository files a command names (`prototxt/...`,
  `scripts/...`, `docker/...`) must exist; a `python scripts/X.py --flag` command needs the
  script, and the flag among its arguments.

Modules and files the pages name in inline code (`mpicaffe/parallel/stall.py`,
`mpicaffe.parallel.stall.STALL_EXIT_CODE`, `tests/mpi_harness.py`) must exist, so a rename that
forgets the docs fails here.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from mpicaffe.cli import build_parser, normalize_argv

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200

SHELL_BLOCKS = {"sh", "bash", "shell", "console"}
OUTPUT_BLOCKS = {"", "text"}  # only their `$ ` lines are commands
OPERATORS = {"&&", "||", ";", "|", "&", ":"}
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")
REPO_DIRS = ("prototxt/", "scripts/", "docker/", "tests/")
LAUNCHERS = {"mpirun", "mpiexec", "srun", "apptainer", "singularity", "sudo", "env", "nice", "timeout"}
FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")
INLINE_CODE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
SOURCE_PATH = re.compile(r"^(mpicaffe|tests|scripts|docker|prototxt)/[\w./-]*$")
MODULE = re.compile(r"^mpicaffe(\.\w+)+$")


@dataclass
class Command:
    """One mpicaffe command found in a page: where, its argv, and whether it is inline prose."""

    where: str
    argv: list[str]
    inline: bool


@dataclass
class Page:
    """A markdown page split into fenced code blocks and prose (code blocks blanked, lines kept)."""

    name: str
    blocks: list[tuple[int, str, list[str]]]  # (first line number, language, lines)
    prose: str


def split_page(name: str, text: str) -> Page:
    """Split a page at its ``` fences (indented ones in list items included)."""
    blocks, prose, block = [], [], None
    for number, line in enumerate(text.splitlines(), 1):
        fence = FENCE.match(line)
        if block is None and fence:
            block = (number + 1, fence.group(2).lower(), [], len(fence.group(1)))
            prose.append("")
        elif block is not None and line.strip() == "```":
            blocks.append(block[:3])
            block = None
            prose.append("")
        elif block is not None:
            block[2].append(line[block[3]:])
            prose.append("")
        else:
            prose.append(line)
    assert block is None, f"{name}: code block opened at line {block[0] - 1} is never closed"
    return Page(name, blocks, "\n".join(prose))


def shell_lines(lines: list[str]):
    """Yield (index of first line, command text): backslash continuations joined, open quotes
    carried onto the next line."""
    text, first = "", None
    for i, line in enumerate(lines):
        first = i if first is None else first
        if line.rstrip().endswith("\\"):
            text += line.rstrip()[:-1] + " "
            continue
        text += line
        try:
            shlex.split(text, comments=True)
        except ValueError:  # a quotation still open: the command goes on
            text += "\n"
            continue
        if text.strip():
            yield first, text
        text, first = "", None
    assert not text.strip(), f"unterminated shell command: {text!r}"


def segments(tokens: list[str], operators: set[str]):
    """Yield (operator before, tokens) for each part of a command line split at its operators."""
    before, segment = "", []
    for token in tokens:
        if token in operators:
            yield before, segment
            before, segment = token, []
        else:
            segment.append(token)
    yield before, segment


def mpicaffe_argvs(tokens: list[str], operators: set[str]):
    """Yield the argv of every `mpicaffe` run by a tokenized command line: the segment's program,
    run by `python -m` or by a launcher (`ruff check mpicaffe` and `from mpicaffe import` are not
    commands), looking into quoted scripts too."""
    launched = False
    for before, segment in segments(tokens, operators):
        program = next((t for t in segment if "=" not in t), "")  # after VAR=value assignments
        # `mpirun A : B` starts B too (MPMD)
        launched = program.rsplit("/", 1)[-1] in LAUNCHERS or (before == ":" and launched)
        for i, token in enumerate(segment):
            if token.rsplit("/", 1)[-1] == "mpicaffe" and (
                    token == program or launched or (i > 0 and segment[i - 1] == "-m")):
                yield segment[i + 1:]
                break
            if "\n" in token or " " in token:  # a quoted script: sh -c '...'
                for _, script in shell_lines(token.splitlines()):
                    yield from mpicaffe_argvs(shlex.split(script, comments=True), operators)


def script_commands(tokens: list[str]):
    """Yield (script, flags) for every `python scripts/X.py --flag ...` in a tokenized line."""
    for _, segment in segments(tokens, OPERATORS):
        for i, token in enumerate(segment[:-1]):
            if re.fullmatch(r"python3?", token) and segment[i + 1].startswith(("scripts/", "./scripts/")):
                flags = [t.split("=", 1)[0] for t in segment[i + 2:] if t.startswith("--")]
                yield segment[i + 1], flags


def commands_in(page: Page) -> tuple[list[Command], list[tuple[str, list[str]]], list[str]]:
    """The page's mpicaffe commands, its `python scripts/...` commands (where, tokens) and the
    repository paths its commands name."""
    commands, scripts, paths = [], [], []

    def take(where: str, tokens: list[str], inline: bool) -> None:
        operators = OPERATORS - {"|"} if inline else OPERATORS  # inline `A | B` is a synopsis
        for argv in mpicaffe_argvs(tokens, operators):
            commands.append(Command(where, argv, inline))
            paths.extend(argv)
        for script, flags in script_commands(tokens):
            scripts.append((where, [script, *flags]))
            paths.append(script)

    for first, language, lines in page.blocks:
        if language in SHELL_BLOCKS:
            found = shell_lines(lines)
        elif language in OUTPUT_BLOCKS:
            found = ((i, line[2:]) for i, line in enumerate(lines) if line.startswith("$ "))
        else:
            continue
        for i, text in found:
            take(f"{page.name}:{first + i}", shlex.split(text, comments=True), inline=False)
    for match in INLINE_CODE.finditer(page.prose):
        span = " ".join(match.group(1).split())
        if not re.search(r"(^|[\s/])mpicaffe(\s|$)|^python3? ", span):
            continue
        try:
            tokens = shlex.split(span)
        except ValueError:
            tokens = span.split()
        take(f"{page.name}:{page.prose.count(chr(10), 0, match.start()) + 1}", tokens, inline=True)
    return commands, scripts, paths


def _all_parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_parsers(sub)


def _accepting_placeholders(convert):
    def value(text: str):
        return text if PLACEHOLDER.match(text) else convert(text)

    value.__name__ = convert.__name__
    return value


def docs_parser(lenient: bool) -> argparse.ArgumentParser:
    """The CLI's parser, taking full flag names only and placeholders for numbers; lenient:
    nothing required, every value optional, no options exclusive."""
    parser = build_parser()
    for p in _all_parsers(parser):
        p.allow_abbrev = False  # a flag shown abbreviated breaks when a longer one is added
        if lenient:
            p._mutually_exclusive_groups = []
        for action in p._actions:
            if action.type not in (None, str):  # int, float, the CLI's own number types
                action.type = _accepting_placeholders(action.type)
            if lenient:
                action.required = False
                if action.nargs is None:
                    action.nargs = "?"
    return parser


def synopsis_argv(argv: list[str]) -> list[str]:
    """`[--stage S]...` -> `--stage S`; `TRAIN|TEST` -> `TRAIN`; bare `|` and `...` dropped."""
    out = []
    for token in argv:
        token = token.lstrip("[").rstrip(".").rstrip("]") if token != "..." else ""
        token = token.split("|", 1)[0]
        if token:
            out.append(token)
    return out


def check_command(argv: list[str], inline: bool) -> None:
    """Parse argv as `mpicaffe` would; raise AssertionError with argparse's message if it fails."""
    if inline:
        argv = synopsis_argv(argv)
    parser = docs_parser(lenient=inline)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            args = parser.parse_args(normalize_argv(argv))
    except SystemExit as e:
        if e.code == 0:  # --help, --version
            return
        raise AssertionError(f"mpicaffe {shlex.join(argv)}: {stderr.getvalue().strip()}") from None
    if isinstance(args.command, list):  # mpicaffe launch ... -- train ...
        inner = args.command[1:] if args.command[:1] == ["--"] else args.command
        assert inner or inline, f"mpicaffe {shlex.join(argv)}: no command after --"
        if inner:
            check_command(inner, inline)


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings (lowercase, punctuation dropped, spaces to -)."""
    anchors: set[str] = set()
    for line in split_page("", text).prose.splitlines():
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.group(1)).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


def broken_links(path: Path, text: str) -> list[str]:
    """Relative links of a page whose file (or heading anchor) does not exist."""
    prose = INLINE_CODE.sub("code", split_page(path.name, text).prose)
    broken = []
    for match in LINK.finditer(prose):
        target = match.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            broken.append(f"{target}: no file {resolved}")
        elif anchor and resolved.suffix == ".md" and anchor not in heading_anchors(resolved.read_text()):
            broken.append(f"{target}: no heading #{anchor} in {resolved.name}")
    return broken


def subcommands() -> list[str]:
    parser = build_parser()
    return [name for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name in action.choices]


def names_in(page: Page) -> list[tuple[str, str]]:
    """(where, name) of each source path (`mpicaffe/parallel/stall.py`) or dotted name
    (`mpicaffe.parallel.stall.STALL_EXIT_CODE`) a page shows in inline code."""
    names = []
    for match in INLINE_CODE.finditer(page.prose):
        name = match.group(1).strip().removesuffix("()")
        if SOURCE_PATH.match(name) or MODULE.match(name):
            names.append((f"{page.name}:{page.prose.count(chr(10), 0, match.start()) + 1}", name))
    return names


def resolves(dotted: str) -> bool:
    """Whether a dotted name is an importable module, or an attribute of one."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def _relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


FOUND = [commands_in(split_page(_relative(p), p.read_text())) for p in PAGES]
COMMANDS = [c for commands, _, _ in FOUND for c in commands]
SCRIPTS = [s for _, scripts, _ in FOUND for s in scripts]
PATHS = sorted({p for _, _, paths in FOUND for p in paths})
NAMES = [n for p in PAGES for n in names_in(split_page(_relative(p), p.read_text()))]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: f"{c.where} {' '.join(c.argv)[:60]}")
def test_every_mpicaffe_command_shown_parses(command):
    check_command(command.argv, command.inline)


def test_the_docs_show_every_subcommand_in_a_code_block():
    shown = {c.argv[0] for c in COMMANDS if not c.inline and c.argv}
    assert set(subcommands()) <= shown
    assert len([c for c in COMMANDS if not c.inline]) >= 30


@pytest.mark.parametrize("where,argv", SCRIPTS, ids=lambda x: str(x))
def test_every_script_command_shown_has_its_flags(where, argv):
    script, *flags = argv
    path = ROOT / script.removeprefix("./")
    assert path.is_file(), f"{where}: {script} does not exist"
    source = path.read_text()
    missing = [f for f in flags if f'"{f}"' not in source]
    assert not missing, f"{where}: {script} defines no {', '.join(missing)}"


def test_repository_files_named_in_commands_exist():
    named = {p.removeprefix("./").split("=", 1)[-1] for p in PATHS}
    missing = [p for p in sorted(named) if p.startswith(REPO_DIRS) and not (ROOT / p).exists()]
    assert not missing


@pytest.mark.parametrize("where,name", NAMES, ids=lambda x: str(x))
def test_modules_and_files_named_in_the_docs_exist(where, name):
    if MODULE.match(name):
        assert resolves(name), f"{where}: {name} is not importable"
    else:
        assert (ROOT / name).exists(), f"{where}: {name} does not exist"


@pytest.mark.parametrize("path", PAGES, ids=_relative)
def test_relative_links_lead_to_files_and_headings(path):
    assert not broken_links(path, path.read_text())


def test_readme_is_at_most_200_lines():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_readme_command_table_lists_every_subcommand():
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in subcommands()
               if not re.search(rf"^\| `mpicaffe {name}\b", readme, re.MULTILINE)]
    assert not missing, f"README's command table lacks {missing}"


def test_readme_shows_the_command_ci_runs():
    ci = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()
          if line.strip().startswith("./")]
    readme_blocks = split_page("README.md", (ROOT / "README.md").read_text()).blocks
    shown = {line.strip() for _, language, lines in readme_blocks if language in SHELL_BLOCKS for line in lines}
    assert ci and set(ci) <= shown


def test_the_checks_fail_on_a_wrong_flag_a_wrong_value_and_a_broken_link(tmp_path):
    page = split_page("bad.md", "```sh\nmpirun -np 2 mpicaffe train --solver s.prototxt --no-such-flag\n```\n"
                                "Or `mpicaffe train --balance sometimes`, `mpicaffe launch -np 2 -- train --weigths W`.\n")
    commands, _, _ = commands_in(page)
    assert [c.inline for c in commands] == [False, True, True]
    for command in commands:
        with pytest.raises(AssertionError):
            check_command(command.argv, command.inline)
    with pytest.raises(AssertionError):
        check_command(["train", "--solver", "S", "--check-every", "often"], inline=False)
    check_command(["train", "--solver", "S", "--check-every", "N"], inline=False)
    (tmp_path / "a.md").write_text("# Title\n")
    assert broken_links(tmp_path / "b.md", "[x](a.md#title) [y](missing.md) [z](a.md#nothing)\n") == [
        f"missing.md: no file {tmp_path / 'missing.md'}", "a.md#nothing: no heading #nothing in a.md"]
