"""The README and the guides: their links lead somewhere, the commands they name
exist, and the README's code runs as written.

Printed samples of output are checked where their commands run (test_cli,
test_examples, test_port, with :func:`helpers.readme_sample`).
"""

from __future__ import annotations

import pathlib
import re

import pytest

from .helpers import ROOT, doc_files, jaxbn_here

FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]+`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# `jaxbn parity ...` in a code span, `$ jaxbn port ...` in a block: a subcommand.
COMMAND = re.compile(r"(?:^|`|\$ )jaxbn ([a-z][\w-]*)", re.MULTILINE)


def prose(text: str) -> str:
    """``text`` without its code blocks and code spans, where links are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def anchors(path: pathlib.Path) -> set[str]:
    """The anchors of a Markdown file's headings, as mkdocs and GitHub spell them."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", path.read_text()), re.MULTILINE)
    return {re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", h).strip().lower()) for h in headings}


def broken_links(path: pathlib.Path) -> list[str]:
    broken = []
    for target in LINK.findall(prose(path.read_text())):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.name}")
    return broken


@pytest.mark.parametrize("doc", doc_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_lead_to_files_and_headings(doc):
    assert broken_links(doc) == []


def test_the_docs_exist():
    names = {str(path.relative_to(ROOT)) for path in doc_files()}
    assert {"README.md", "docs/cli.md", "benchmarks/README.md", "CONTRIBUTING.md"} <= names


def test_every_jaxbn_command_named_is_one(capsys):
    named = {
        command
        for path in doc_files()
        for block in [*FENCE.findall(path.read_text()), *CODE_SPAN.findall(path.read_text())]
        for command in COMMAND.findall(block.strip("`"))
    }
    assert {"parity", "port"} <= named
    unknown = {command for command in named if jaxbn_here(capsys, command, "--help")[0] != 0}
    assert unknown == set()


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


@pytest.mark.slow
def test_readme_code_runs_as_written(tmp_path, monkeypatch):
    """Every Python block of the README, in order, in one namespace: the quickstart,
    the pure function, a ResNet-18 ported and back in torch, a checkpoint converted."""
    monkeypatch.chdir(tmp_path)  # the port and the checkpoint are written here
    blocks = python_blocks((ROOT / "README.md").read_text())
    assert len(blocks) == 4
    namespace: dict[str, object] = {}
    for number, block in enumerate(blocks):
        exec(compile(block, f"README.md, Python block {number + 1}", "exec"), namespace)
    assert namespace["y"].shape == (2, 8, 8, 8)  # type: ignore[attr-defined]
    assert (tmp_path / "resnet18-port" / "model.py").exists()


COMMAND_LINE = re.compile(r"(?:^\$ |^|`)(jaxbn [a-z][^`\n]*)", re.MULTILINE)


def test_every_jaxbn_command_line_shown_parses():
    """Each whole `jaxbn ...` line of the docs (a sample, a code span) is one the parser
    takes as written: its options exist and their values have the right form."""
    import shlex

    from jaxbn.cli import build_parser

    commands = {
        tuple(shlex.split(match, comments=True))
        for path in doc_files()
        for block in [*FENCE.findall(path.read_text()), *CODE_SPAN.findall(path.read_text())]
        for match in COMMAND_LINE.findall(block.strip("`"))
        # (a synopsis: placeholders and [options], not a command to type)
        if not re.search(r"\[|\.\.\.|[A-Z]{2,}[:,]|--[a-z-]+ [A-Z]+\b", match)
    }
    # Whole commands: not a subcommand named in prose, nor a printed header ("jaxbn port
    # benchmark: ...").
    commands = {c for c in commands if len(c) > 2 and not c[2].endswith(":")}
    assert len(commands) >= 8
    refused = []
    for command in sorted(commands):
        try:
            build_parser().parse_args(command[1:])
        except SystemExit:
            refused.append(" ".join(command))
    assert refused == []
