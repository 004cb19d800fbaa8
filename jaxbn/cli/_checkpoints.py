"""What ``convert`` and ``inspect`` share: the --kind arguments, the converter's
refusals as one line, and the per-layer summary with its problems in shell syntax."""

from __future__ import annotations

import argparse
import pathlib
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ._common import USAGE, CommandError


def add_mapping_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kind",
        action="append",
        default=[],
        metavar="PREFIX=KIND",
        help="layer kind of a torch module, e.g. --kind embed=Embedding (repeatable)",
    )


def parse_kinds(pairs: Sequence[str]) -> dict[str, str]:
    """``--kind PREFIX=KIND`` arguments as a mapping, each kind checked."""
    from ..convert import LAYERS, TORCH_MODULES

    kinds = {}
    for pair in pairs:
        prefix, sep, kind = pair.partition("=")
        if not sep or not kind:
            raise CommandError(
                f"--kind expects PREFIX=KIND, got {pair!r}; e.g. --kind embed=Embedding", USAGE
            )
        if kind not in LAYERS and kind not in TORCH_MODULES:
            raise CommandError(
                f"--kind {pair}: unknown layer kind {kind!r}; use one of "
                f"{', '.join(sorted(LAYERS))} or a torch.nn class name such as Conv2d",
                USAGE,
            )
        kinds[prefix] = kind
    return kinds


@contextmanager
def conversion_errors(path: pathlib.Path) -> Iterator[None]:
    """The converter's refusals of a whole checkpoint, as ``CommandError``."""
    try:
        yield
    except TypeError as error:  # not a state dict of tensors
        raise CommandError(f"{path}: {error}") from None
    except OverflowError as error:  # num_batches_tracked beyond int32
        first = str(error).split(". ")[0]
        raise CommandError(
            f"{path}: {first}; run with JAX_ENABLE_X64=1 to keep it exactly, or pass "
            "--saturate-counts to clamp it (it only matters for momentum=None)"
        ) from None


def problem_count(report: Any) -> int:
    return sum(len(items) for items in report.problems.values())


def format_summary(report: Any, *, template_given: bool) -> str:
    """One row per tensor, grouped by layer: kind, shapes and layout; then the problems."""
    rows = [("layer", "kind", "torch", "", "flax", "layout")]
    previous = None
    for entry in report.entries:
        layer = entry.torch_key.rpartition(".")[0] or "<root>"
        shown = layer if layer != previous else ""
        previous = layer
        name = entry.torch_key.rpartition(".")[2]
        rows.append(
            (
                shown,
                entry.kind if shown else "",
                f"{name} {list(entry.torch_shape)}",
                "->",
                f"{entry.flax_name} {list(entry.flax_shape)} {entry.dtype}",
                entry.rule
                if entry.rule != "keep"
                else ""
                if entry.layout == "same"
                else entry.layout,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    layers = len({e.torch_key.rpartition(".")[0] for e in report.entries})
    lines.append(f"\n{len(report.entries)} tensors in {layers} layers")
    lines.extend(f"note: {note}" for note in report.notes)
    if report.settings:
        lines.append(
            "\nsettings the state dict does not carry, where they differ from PyTorch's "
            "defaults (build the Flax layers with them):"
        )
        groups: dict[tuple[str, str, str], list[str]] = {}
        for setting in report.settings:
            default = str(setting).rpartition(" (")[2].removesuffix(")")
            key = (setting.name, repr(setting.value), default)
            groups.setdefault(key, []).append(setting.layer or "<root>")
        for (name, value, default), layers in groups.items():
            shown = ", ".join(layers[:4]) + (
                f", ... ({len(layers)} layers)" if len(layers) > 4 else ""
            )
            lines.append(f"  {name}={value} ({default}): {shown}")
    lines.extend(f"layout: {note}" for note in report.layout_notes)
    for group, items in report.problems.items():
        lines.append(f"\n{group} ({len(items)}):")
        for item in items:
            hinted = ambiguity_hint(item, template_given) if group == "ambiguous" else item
            lines.append(f"  {in_shell_syntax(hinted, template_given)}")
    return "\n".join(lines)


_AMBIGUOUS = re.compile(r"^(?P<prefix>.*?): ambiguous: could be (?P<kinds>[^;]+);")


_KEYS = re.compile(r"\(keys: (?P<keys>[^)]*)\)$")


def ambiguity_hint(line: str, template_given: bool) -> str:
    """The converter's ambiguity line, with its fix in command-line syntax.

    >>> ambiguity_hint(
    ...     "embed: ambiguous: could be Linear or Embedding; pass e.g. "
    ...     "kinds={'embed': 'Linear'}, the torch module, or a template (keys: weight)",
    ...     template_given=True,
    ... )
    'embed (weight): could be Linear or Embedding; pass --kind embed=Linear or --kind embed=Embedding'
    """
    from ..convert import LAYERS

    match = _AMBIGUOUS.match(line)
    if match is None:  # a line this formatter does not know: shown as it is
        return line
    prefix, candidates = match["prefix"], match["kinds"]
    keys = _KEYS.search(line)
    options = [
        f"--kind {prefix}={kind}" for kind in candidates.split(" or ") if kind.strip() in LAYERS
    ]
    if not template_given:
        options.append("--template VARS")
    named = f"{prefix} ({keys['keys']})" if keys else prefix
    return f"{named}: could be {candidates}; pass {' or '.join(options)}"


_KINDS_ARGUMENT = re.compile(r"kinds=\{'(?P<prefix>[^']*)': '(?P<kind>[^']*)'\}")


def in_shell_syntax(line: str, template_given: bool) -> str:
    """A converter hint with Python's ``kinds={...}`` and "a template" as this command's flags.

    >>> in_shell_syntax("pass kinds={'head': 'Param'} or a template", template_given=False)
    'pass --kind head=Param or --template VARS'
    """
    line = _KINDS_ARGUMENT.sub(lambda m: f"--kind {m['prefix']}={m['kind']}", line)
    return line.replace(" or a template", "" if template_given else " or --template VARS")
