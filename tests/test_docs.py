"""The documentation cannot rot: every cifar_exp command in README.md, docs/ and the
measurement log parses and composes with today's code, and every relative link and
#anchor in the markdown resolves."""

from __future__ import annotations

import argparse
import functools
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict

from cifar_exp import evaluate, predict
from cifar_exp.config import command_overrides, compose_config, key_table, validate
from cifar_exp.data import argument_parser as data_arguments
from cifar_exp.errors import UserError
from cifar_exp.serving.trained import apply_overrides
from cifar_exp.tools.bench import argument_parser as bench_arguments
from cifar_exp.tracking.report import argument_parser as report_arguments

ROOT = Path(__file__).resolve().parents[1]
CONFIGURATION = ROOT / "docs" / "configuration.md"
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             ROOT / "experiments" / "README.md"]
SKIPPED_FOLDERS = {".venv", "outputs", "multirun", "reports", "data", "node_modules"}

# What the documents' placeholders stand for, so that a command can be parsed as written.
PLACEHOLDERS = {
    "<run_id>": "0123456789abcdef0123456789abcdef",
    "<parent_run_id>": "fedcba9876543210fedcba9876543210",
    "<checkpoint>": "outputs/2026-12-01/10-00-00/checkpoint.pt",
    "<run_dir>": "outputs/2026-12-01/10-00-00",
    "<sweep_dir>": "multirun/2026-12-01/10-00-00",
    "<image>": "cat.png",
    "<model_uri>": "models:/m-0123456789abcdef",
    "<host>": "localhost",
}
FENCE = re.compile(r"^\s*(```|~~~)(\w*)")
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console"}
# A cifar_exp command: `python -m cifar_exp.<module>` (any python, in a venv or not),
# `cifar-exp[-tool]`, or torchrun starting cifar_exp.run; after `VAR=value` prefixes.
COMMAND = re.compile(r"^(?:\$\s+)?(?:\w+=\S*\s+)*(?:\S*/)?"
                     r"(?:python3?\s+-m\s+(?P<module>cifar_exp(?:\.\w+)*)"
                     r"|(?P<script>cifar-exp(?:-\w+)?)"
                     r"|torchrun\s+(?:\S+\s+)*?-m\s+(?P<torchrun>cifar_exp\.run))(?=\s|$)")
SCRIPTS = {"cifar-exp": "cifar_exp.run", "cifar-exp-evaluate": "cifar_exp.evaluate",
           "cifar-exp-predict": "cifar_exp.predict", "cifar-exp-report": "cifar_exp.report",
           "cifar-exp-bench": "cifar_exp.bench"}
# Hydra's flags that print instead of running: composing the overrides checks them all.
PRINTING_FLAGS = {"--cfg": 1, "-c": 1, "--package": 1, "-p": 1, "--resolve": 0}
# Flags answered by Hydra itself: run them, as a user would.
ANSWERED_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion",
                  "-sc"}


@dataclass(frozen=True)
class Command:
    where: str  # file:line
    module: str  # cifar_exp.run, cifar_exp.evaluate, ...
    args: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.where}: python -m {self.module} {' '.join(self.args)}"


def code_lines(path: Path) -> Iterator[tuple[int, str]]:
    """The lines of `path`'s shell code blocks, with their line numbers; a line continued
    with a backslash is joined to the next."""
    language = None  # None: outside a block
    pending, start = "", 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fence = FENCE.match(line)
        if fence:
            language = fence.group(2) if language is None else None
        elif language is not None and language in SHELL_LANGUAGES:
            start = start or number
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            yield start, pending + line
            pending, start = "", 0


def documented_commands() -> list[Command]:
    commands = []
    for path in DOCUMENTS:
        for number, line in code_lines(path):
            for part in re.split(r"&&|\|\||;|\|", line):
                text = part.strip()
                for placeholder, value in PLACEHOLDERS.items():
                    text = text.replace(placeholder, value)
                found = COMMAND.match(text)
                if not found:
                    continue
                module = (found.group("module") or found.group("torchrun")
                          or SCRIPTS.get(found.group("script"), found.group("script")))
                where = f"{path.relative_to(ROOT)}:{number}"
                try:
                    args = tuple(shlex.split(text[found.end():], comments=True))
                except ValueError as error:  # unbalanced quotes: the test says so
                    args = ("<unparsable>", str(error))
                unknown = re.findall(r"<[^<>]*>", " ".join(args))
                if unknown and args[0] != "<unparsable>":
                    args = ("<unparsable>", f"{unknown[0]} is not one of the placeholders "
                            f"{', '.join(PLACEHOLDERS)}")
                commands.append(Command(where, module, args))
    return commands


COMMANDS = documented_commands()


def test_the_documents_hold_commands():
    # The collection itself works: the README's two commands and the tutorial's runs at
    # least, across the README and the docs pages.
    modules = {command.module for command in COMMANDS}
    assert {"cifar_exp.run", "cifar_exp.data", "cifar_exp.evaluate", "cifar_exp.predict",
            "cifar_exp.report"} <= modules
    assert len({command.where.split(":")[0] for command in COMMANDS}) >= 5
    assert len(COMMANDS) >= 50


def check_run(args: list[str]) -> None:
    """Compose the run (or each sweep's first and last job) as Hydra would, then check it
    as a job does before it reads any data."""
    if ANSWERED_FLAGS & set(args):
        answer = subprocess.run([sys.executable, "-m", "cifar_exp.run", *args], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert answer.returncode == 0, answer.stderr
        return
    overrides, multirun, skip = [], False, 0
    for arg in args:
        if skip:
            skip -= 1
        elif arg in ("-m", "--multirun"):
            multirun = True
        elif arg in PRINTING_FLAGS:
            skip = PRINTING_FLAGS[arg]
        else:
            assert not arg.startswith("-"), f"{arg}: a flag this test does not know"
            overrides.append(arg)
    overrides = command_overrides(overrides)
    parsed = OverridesParser.create().parse_overrides(overrides)
    if multirun:
        jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
        jobs = [jobs[0], jobs[-1]]
    else:
        assert not any(o.is_sweep_override() for o in parsed), "a sweep without -m"
        jobs = [overrides]
    for job in jobs:
        cfg = compose_config(list(job), with_hydra=True)
        with open_dict(cfg):
            del cfg["hydra"]
        validate(cfg)


def check_evaluate(args: list[str]) -> None:
    if {"-h", "--help"} & set(args):
        return  # its usage text: nothing to parse
    parsed = evaluate.parse(args)
    trained = OmegaConf.to_container(compose_config(), resolve=True)
    apply_overrides(trained, parsed.settings)


def check_bench(args: list[str]) -> None:
    parsed = parse(bench_arguments(), args)
    if parsed is not None:
        validate(compose_config(command_overrides(parsed.overrides)))


def parse(parser: argparse.ArgumentParser, args: list[str]) -> argparse.Namespace | None:
    """`args` parsed by a tool's own parser; None for its --help."""
    if {"-h", "--help"} & set(args):
        return None
    try:
        return parser.parse_args(args)
    except (SystemExit, UserError) as refused:
        raise AssertionError(f"refused by its parser: {args}: {refused}") from refused


CHECKS = {
    "cifar_exp.run": check_run,
    "cifar_exp.evaluate": check_evaluate,
    "cifar_exp.predict": lambda args: parse(predict.argument_parser(), args),
    "cifar_exp.report": lambda args: parse(report_arguments(), args),
    "cifar_exp.bench": check_bench,
    "cifar_exp.data": lambda args: parse(data_arguments(), args),
}


@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: command.where)
def test_a_documented_command_composes(command, monkeypatch, data_root):
    assert command.module in CHECKS, f"{command}: no such command"
    assert "<unparsable>" not in command.args, f"{command.where}: {command.args[1]}"
    monkeypatch.setenv("CIFAR_EXP_DATA", str(data_root))
    args = [os.path.expandvars(arg) for arg in command.args]
    try:
        CHECKS[command.module](args)
    except Exception as error:
        raise AssertionError(f"{command}\n  fails: {error}") from error


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"<[^>]+>", "", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def prose_lines(path: Path) -> Iterator[tuple[int, str]]:
    """The lines of `path` outside code blocks, with their line numbers."""
    in_code = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code:
            yield number, line


@functools.cache  # a page is linked many times: read its headings once
def anchors(path: Path) -> set[str]:
    found, seen = set(), {}
    for _, line in prose_lines(path):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            base = slug(heading.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
        found.update(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", line))
    return found


def markdown_files() -> list[Path]:
    return sorted(path for path in ROOT.rglob("*.md")
                  if not SKIPPED_FOLDERS & set(path.relative_to(ROOT).parts[:-1])
                  and not any(part.startswith(".") for part in path.relative_to(ROOT).parts))


def relative_links(path: Path) -> Iterator[tuple[int, str]]:
    """The relative link targets of `path` outside code, with their line numbers."""
    for number, line in prose_lines(path):
        prose = re.sub(r"`[^`]*`", "", line)
        for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, mailto:, ...
                yield number, target


def broken_links(files: list[Path]) -> list[str]:
    """`file:line: target (why)` for each relative link in `files` that does not resolve."""
    broken = []
    for path in files:
        for number, target in relative_links(path):
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.name}:{number}: {target}"
            if not linked.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{where} (no heading #{anchor})")
    return broken


def test_every_relative_link_and_anchor_resolves():
    files = markdown_files()
    assert ROOT / "README.md" in files and len(files) >= 10
    broken = broken_links(files)
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A page\n\n## Two `words`, here\n\n[ok](#two-words-here) "
                    "[gone](#three-words) [file](missing.md) `[code](nowhere.md)` "
                    "[web](https://example.org)\n\n```bash\n[not a link](x.md)\n```\n")
    assert anchors(page) == {"a-page", "two-words-here"}
    assert broken_links([page]) == ["page.md:5: #three-words (no heading #three-words)",
                                    "page.md:5: missing.md (no such file)"]


def cells(row: str) -> tuple[str, ...]:
    """The cells of a markdown table row, stripped; an escaped `\\|` stays in its cell."""
    return tuple(cell.strip() for cell in re.split(r"(?<!\\)\|", row.strip())[1:-1])


def table_of_keys(path: Path) -> list[tuple[str, ...]]:
    """The (key, default) cells of each row of `path`'s table of keys, the table whose
    header is `| key | default | meaning |`."""
    rows: list[tuple[str, ...]] = []
    inside = False
    for _, line in prose_lines(path):
        if cells(line)[:2] == ("key", "default"):
            inside = True
        elif inside and line.startswith("|"):
            if not set(line) <= set("|- :"):  # not the separator row
                rows.append(cells(line)[:2])
        elif inside:
            break
    return rows


def test_the_table_of_keys_is_the_schemas():
    # Every key of the schema with its default, and nothing else: a new key fails here
    # until the page documents it (rows to paste: cifar_exp.config.key_table()).
    documented = table_of_keys(CONFIGURATION)
    schema = [cells(row) for row in key_table()]
    assert len(set(documented)) == len(documented), "a row is there twice"
    lacks = [" | ".join(row) for row in schema if row not in documented]
    extra = [" | ".join(row) for row in documented if row not in schema]
    assert not lacks and not extra, (
        f"{CONFIGURATION.name}'s table of keys differs from the schema (cifar_exp/config.py)"
        f"\n  rows it lacks: {lacks}\n  rows the schema does not give: {extra}")


def test_the_table_check_reads_keys_and_defaults(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("| key | default | meaning |\n| --- | --- | --- |\n"
                    "| `amp` | `auto` | `auto` \\| `fp32` |\n| `steps` | 3000 | steps |\n\n"
                    "| key | other |\n| --- | --- |\n| `x` | 1 |\n")
    assert table_of_keys(page) == [("`amp`", "`auto`"), ("`steps`", "3000")]
