"""The documentation as a reader meets it: the configuration page is the schema's, every relative link in the README
and docs/ leads somewhere, and every `mokd ...` command line they quote parses."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import re
import shlex
from pathlib import Path
from typing import Optional

import pytest

from mokd import config as schema
from mokd.errors import MokdError
from mokd.launch import components  # noqa: F401  (the components' checks, which load_config runs)
from mokd.launch.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_configuration_page_is_generated_from_the_schema():
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == schema.reference_markdown(), (
        "docs/configuration.md is stale: regenerate it with `mokd config --markdown > docs/configuration.md`")


def test_configuration_page_changes_when_an_option_does(monkeypatch):
    """The check above can fail: a changed help text (or default) changes the generated page."""
    before = schema.reference_markdown()
    train_fields = {item.name: item for item in dataclasses.fields(schema.TrainConfig)}
    changed = dict(train_fields["epochs"].metadata, help="a different meaning")
    monkeypatch.setattr(train_fields["epochs"], "metadata", changed)
    assert schema.reference_markdown() != before


# --- Links: every relative link of the README and docs/ leads to a file, and an #anchor to one of its headings ---

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`+[^`]*`+")
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def split_fences(text: str) -> tuple[list[tuple[int, str]], list[list[tuple[int, str]]]]:
    """(numbered lines outside fenced code blocks, the fenced blocks as lists of numbered lines)."""
    prose, blocks, block = [], [], None
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            if block is None:
                block = []
            else:
                blocks.append(block)
                block = None
        elif block is None:
            prose.append((number, line))
        else:
            block.append((number, line))
    return prose, blocks


def github_slug(heading: str) -> str:
    """GitHub's anchor of a heading: link text only, lowercase, punctuation dropped except '-' and '_', spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return "".join(ch for ch in text if ch.isalnum() or ch in "-_ ").replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """A page's heading anchors; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in split_fences(page.read_text())[0]:
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(1))
        found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return found


def broken_links(page: Path, root: Path = REPO) -> list[str]:
    broken = []
    for number, line in split_fences(page.read_text())[0]:
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto: ...
                continue
            path_part, _, anchor = target.partition("#")
            resolved = (page.parent / path_part).resolve() if path_part else page
            where = f"{page.relative_to(root)}:{number}: ({target})"
            if not resolved.is_relative_to(root.resolve()):
                broken.append(f"{where} leaves the repository")
            elif not resolved.exists():
                broken.append(f"{where} {resolved.relative_to(root.resolve())} does not exist")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{where} no heading with anchor #{anchor} in {resolved.name}")
    return broken


def test_every_relative_link_leads_to_a_file_and_heading():
    assert len(PAGES) > 10, PAGES  # the README and the docs/ pages
    broken = [problem for page in PAGES for problem in broken_links(page)]
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_link_check_catches_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text("# Title\n\n## What a run `holds`, and why\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "docs" / "a.md"
    page.write_text("# A\n\n[ok](b.md#what-a-run-holds-and-why) [ok](b.md#twice-1) [ok](#a) [web](https://x.org/y)\n"
                    "`[not a link](nowhere.md)`\n```\n[not a link](nowhere.md)\n```\n"
                    "[gone](c.md) [no heading](b.md#twice-2) [outside](../../x.md) [self](#b)\n")
    problems = broken_links(page, tmp_path)
    assert len(problems) == 4, problems
    assert "c.md does not exist" in problems[0] and "#twice-2" in problems[1]
    assert "leaves the repository" in problems[2] and "#b in a.md" in problems[3]


# --- Commands: every `mokd ...` line quoted in a fenced block parses, and its key=value overrides are real options ---

SHELL_OPERATOR = re.compile(r"^[();<>|&]+$")
PLACEHOLDER = re.compile(r"<[^>]*>|\.\.\.|\$\(")  # `<...>`, `...`, `$(...)`: not a concrete command line
MAKE_DEMO = ["train", "--preset", "demo"]  # what `make demo ARGS="..."` runs (Makefile)


def command_lines(page: Path) -> list[tuple[int, str]]:
    """The logical lines of the page's fenced code blocks (backslash continuations joined, a leading `$ ` dropped)."""
    lines = []
    for block in split_fences(page.read_text())[1]:
        pending, start = "", 0
        for number, line in block:
            start = start or number
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            lines.append((start, re.sub(r"^\s*\$\s+", "", pending + line).strip()))
            pending, start = "", 0
    return lines


def mokd_arguments(line: str) -> Optional[list[str]]:
    """The arguments the line hands to the `mokd` program: `mokd ARGS`, `... -m mokd.launch.cli ARGS` (torchrun,
    python) or `--module mokd.launch.cli ARGS` (deepspeed), `make demo ARGS="..."`; None for any other line. Cut at
    a shell operator (`>`, `|`, `&&`, ...) and at a comment."""
    if not re.search(r"(^|\s)mokd(\s|$)|mokd\.launch\.cli|^make demo", line):
        return None  # not lexed: output and Python lines need not be shell words
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = list(lexer)
    for index, word in enumerate(words):
        if SHELL_OPERATOR.match(word):
            words = words[:index]
            break
    if words[:1] == ["mokd"]:
        return words[1:]
    if "mokd.launch.cli" in words and words[words.index("mokd.launch.cli") - 1] in ("-m", "--module"):
        return words[words.index("mokd.launch.cli") + 1:]
    if words[:2] == ["make", "demo"]:
        return MAKE_DEMO + [item for word in words[2:] if word.startswith("ARGS=")
                            for item in shlex.split(word[len("ARGS="):])]
    return None


@functools.cache
def shared_parser() -> argparse.ArgumentParser:
    return build_parser()


def command_problem(arguments: list[str]) -> Optional[str]:
    """Why `mokd ARGUMENTS` would be refused before any work: argparse's message, or the configuration's
    (an unknown key, a bad value, an unknown preset) for the commands that build one from --preset and overrides."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            args = shared_parser().parse_args(arguments)
    except SystemExit:
        return errors.getvalue().strip().splitlines()[-1]
    if args.command in ("train", "config", "plan") or (args.command == "bench" and args.bench == "throughput"):
        for preset in args.preset if isinstance(args.preset, list) else [args.preset]:
            try:
                schema.load_config(preset, args.overrides)
            except MokdError as error:
                return f"preset {preset}: {error}"
    return None


def bad_commands(page: Path, root: Path = REPO) -> list[str]:
    bad = []
    for number, line in command_lines(page):
        try:
            arguments = mokd_arguments(line) if not PLACEHOLDER.search(line) else None
        except ValueError as error:  # shlex: an unclosed quote
            arguments, problem = None, f"not shell words: {error}"
        else:
            problem = None
        problem = problem or (None if arguments is None else command_problem(arguments))
        if problem:
            bad.append(f"{page.relative_to(root)}:{number}: {line}\n    {problem}")
    return bad


def test_every_quoted_mokd_command_parses_with_valid_options():
    checked = [line for page in PAGES for _, line in command_lines(page)
               if not PLACEHOLDER.search(line) and mokd_arguments(line) is not None]
    assert len(checked) >= 30, checked  # the docs quote many; a broken extractor would find none
    bad = [problem for page in PAGES for problem in bad_commands(page)]
    assert not bad, "command lines that mokd refuses:\n" + "\n".join(bad)


def test_the_command_check_catches_bad_options_presets_and_keys(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```bash\n"
                    "$ mokd train --preset demo train.epochs=2   # fine\n"
                    "mokd config --markdown > docs/configuration.md\n"
                    "mokd train --preset demo \\\n    train.epoch=2\n"
                    "torchrun --nproc_per_node 2 -m mokd.launch.cli train --preset demo_vit parallel.strategy=fsdp\n"
                    "mokd eval knn --runs runs/demo\n"
                    "make demo ARGS=\"train.threads=1 data.n_local_crop=6\"\n"
                    "mokd bench throughput --preset demo,r50_vit_s --batch 2 model2.optim.base_lr=-1\n"
                    "mokd plan --preset <NAME> --world-size 2\n"
                    "mokd train run_dir='runs/x\n"
                    "```\n")
    bad = bad_commands(page, tmp_path)
    assert [problem.split(":")[1] for problem in bad] == ["4", "6", "7", "8", "9", "11"], bad
    assert "train.epoch" in bad[0] and "demo_vit" in bad[1] and "--runs" in bad[2]
    assert "data.n_local_crop" in bad[3] and "base_lr" in bad[4] and "closing quotation" in bad[5]
