"""The ``jaxbn`` command."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="jaxbn", description="PyTorch-exact BatchNorm for JAX/Flax: tools."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    parity = commands.add_parser(
        "parity",
        help="compare jaxbn with the installed torch on the built-in cases",
        description=(
            "Run every built-in parity case (layer kind x options, 10 training "
            "steps then 3 eval steps) against the installed torch and print the "
            "largest |jaxbn - torch| of the output, each gradient and each running "
            "statistic. Exits 1 if any case fails."
        ),
    )
    parity.add_argument(
        "--json", type=pathlib.Path, metavar="PATH", help="also save results as JSON"
    )
    parity.add_argument("-k", metavar="TEXT", help="only cases whose name contains TEXT")
    parity.add_argument("--list", action="store_true", help="list the cases and exit")
    parity.set_defaults(run=run_parity)

    convert = commands.add_parser(
        "convert",
        help="convert a PyTorch checkpoint into a Flax msgpack file",
        description=(
            "Read CKPT (.pt/.pth/.bin/.ckpt without executing pickled code, or "
            ".safetensors), convert every tensor with jaxbn.from_torch, print a "
            "per-layer summary and write OUT with Flax's msgpack serialization. "
            "Keys that cannot be converted are always listed; with --strict or "
            "--template they make the command fail (exit 1) and nothing is written."
        ),
    )
    convert.add_argument("checkpoint", type=pathlib.Path, metavar="CKPT")
    convert.add_argument("-o", "--output", type=pathlib.Path, required=True, metavar="OUT")
    convert.add_argument(
        "--template",
        type=pathlib.Path,
        metavar="VARS",
        help="a Flax msgpack file (e.g. saved model.init output) the result must match",
    )
    convert.add_argument("--strict", action="store_true", help="fail on any unconverted key")
    add_mapping_arguments(convert)
    convert.add_argument(
        "--saturate-counts",
        action="store_true",
        help="clamp num_batches_tracked beyond int32 instead of failing (x64 off)",
    )
    convert.set_defaults(run=run_convert)

    inspect = commands.add_parser(
        "inspect",
        help="list a checkpoint's layers and inferred kinds without converting",
    )
    inspect.add_argument("checkpoint", type=pathlib.Path, metavar="CKPT")
    add_mapping_arguments(inspect)
    inspect.set_defaults(run=run_inspect)

    bench = commands.add_parser(
        "bench",
        help="time jaxbn against Flax, PyTorch and the memory-bandwidth floor",
        description=(
            "Time jaxbn, flax.linen.BatchNorm (fast and two-pass variance), "
            "torch.nn.BatchNorm2d (NCHW and channels_last) and a bandwidth probe "
            "(jitted copy and sum of the same tensor), interleaved in one process, "
            "for eval, train forward and train forward+backward; print medians, "
            "GB/s, ratios to the floor and to jaxbn, page faults, compile times, and "
            "the performance targets. Runs on the default JAX device (and CUDA for "
            "torch when present)."
        ),
    )
    from ._bench import LAYOUTS, MODES, SHAPES

    bench.add_argument(
        "--shape", action="append", choices=list(SHAPES), help="repeatable; default all"
    )
    bench.add_argument(
        "--layout", action="append", choices=LAYOUTS, help="repeatable; default both"
    )
    bench.add_argument("--mode", action="append", choices=MODES, help="repeatable; default all")
    bench.add_argument(
        "--reps", type=int, default=10, help="rounds of interleaved calls (default 10)"
    )
    bench.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    bench.add_argument(
        "--json", type=pathlib.Path, metavar="PATH", help="also save the timings as JSON"
    )
    bench.set_defaults(run=run_bench)

    from .port._cli import add_parser as add_port_parser

    add_port_parser(commands)

    args = parser.parse_args(argv)
    return args.run(args)


def add_mapping_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kind",
        action="append",
        default=[],
        metavar="PREFIX=KIND",
        help="layer kind of a torch module, e.g. --kind embed=Embedding (repeatable)",
    )


def parse_kinds(pairs: Sequence[str]) -> dict[str, str]:
    kinds = {}
    for pair in pairs:
        prefix, sep, kind = pair.partition("=")
        if not sep:
            raise SystemExit(f"--kind expects PREFIX=KIND, got {pair!r}")
        kinds[prefix] = kind
    return kinds


def run_parity(args: argparse.Namespace) -> int:
    from . import parity

    cases = [case for case in parity.builtin_cases() if not args.k or args.k in case.name]
    if args.list:
        print("\n".join(case.name for case in cases))
        return 0
    if not cases:
        print(f"no case matches -k {args.k!r}; see jaxbn parity --list", file=sys.stderr)
        return 2
    environment = parity.environment()
    print("jaxbn parity against " + ", ".join(f"{k} {v}" for k, v in environment.items()))
    results = parity.run(cases, on_result=progress)
    print(parity.format_table(results))
    if args.json:
        report = {
            "environment": dict(environment),
            "results": [r.to_json() for r in results],
        }
        args.json.write_text(json.dumps(report, indent=2))
        print(f"results saved to {args.json}")
    return 0 if all(r.passed for r in results) else 1


def progress(done: int, total: int, result: object) -> None:
    """One line per case, or a single updating line on a terminal."""
    from .parity import CaseResult

    assert isinstance(result, CaseResult)
    status = "ok" if result.passed else "FAIL"
    text = f"[{done:>{len(str(total))}}/{total}] {status:4} {result.case.name}"
    if sys.stderr.isatty():
        end = "\n" if done == total or not result.passed else ""
        print(f"\r\033[K{text}", end=end, file=sys.stderr, flush=True)
    else:
        print(text, file=sys.stderr, flush=True)


def load_or_exit(path: pathlib.Path) -> Any:
    from .convert import CheckpointError, load_checkpoint

    try:
        return load_checkpoint(path)
    except CheckpointError as error:
        raise SystemExit(f"jaxbn: {error}") from None


def run_convert(args: argparse.Namespace) -> int:
    from .convert import CheckpointError, from_torch, load_variables, save_variables

    state = load_or_exit(args.checkpoint)
    template = None
    if args.template:
        try:
            template = load_variables(args.template)
        except CheckpointError as error:
            raise SystemExit(f"jaxbn: {error}") from None
    variables, report = from_torch(
        state,
        template,
        strict=False,
        kinds=parse_kinds(args.kind),
        counts="saturate" if args.saturate_counts else "error",
        progress=progress_bar,
    )
    print(format_summary(report))
    if report.problems and (args.strict or args.template):
        print(f"\nnot written: {args.output}", file=sys.stderr)
        return 1
    save_variables(args.output, variables)
    print(f"\nwrote {args.output} ({len(report.entries)} arrays)")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from .convert import inspect

    report = inspect(load_or_exit(args.checkpoint), kinds=parse_kinds(args.kind))
    print(format_summary(report))
    return 0


def format_summary(report: Any) -> str:
    """One row per tensor, grouped by layer: kind, shapes and layout."""
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
                "" if entry.layout == "same" else entry.layout,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.append(
        f"\n{len(report.entries)} tensors in {len({e.torch_key.rpartition('.')[0] for e in report.entries})} layers"
    )
    lines.extend(f"note: {note}" for note in report.notes)
    if report.problems:
        lines.append("\n" + report.describe_problems())
    return "\n".join(lines)


def run_bench(args: argparse.Namespace) -> int:
    # PyTorch's OpenMP threads otherwise spin after each call and steal the
    # cores from whatever runs next; must be set before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from . import _bench

    environment = _bench.environment(with_torch=not args.no_torch)
    print("jaxbn bench: " + ", ".join(f"{k} {v}" for k, v in environment.items()))
    timings = _bench.run(
        args.shape or list(_bench.SHAPES),
        args.layout or list(_bench.LAYOUTS),
        args.mode or list(_bench.MODES),
        reps=args.reps,
        with_torch=not args.no_torch,
        progress=lambda what: print(f"timing {what} ...", file=sys.stderr, flush=True),
    )
    print(_bench.format_report(timings))
    if args.json:
        report = {"environment": dict(environment), "timings": [t.to_json() for t in timings]}
        report["targets"] = [
            {"target": what, "value": value, "bar": bar, "met": met}
            for what, value, bar, met in _bench.targets(timings)
        ]
        args.json.write_text(json.dumps(report, indent=2))
        print(f"timings saved to {args.json}")
    return 0


def progress_bar(done: int, total: int) -> None:
    """A bar on a terminal for checkpoints of many tensors; silent otherwise."""
    if total < 100 or not sys.stderr.isatty():
        return
    filled = 30 * done // total
    print(
        f"\r[{'#' * filled}{' ' * (30 - filled)}] {done}/{total} tensors", end="", file=sys.stderr
    )
    if done == total:
        print(file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
