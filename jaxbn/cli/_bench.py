"""``jaxbn bench``: jaxbn timed against Flax, PyTorch and the bandwidth floor."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from typing import Any

from ._common import check_output_file, positive_int


def add_parser(commands: Any) -> argparse.ArgumentParser:
    from .._bench import LAYOUTS, MODES, SHAPES

    bench = commands.add_parser(
        "bench",
        help="time jaxbn against Flax, PyTorch and the memory-bandwidth floor",
        description=(
            "Time jaxbn, flax.linen.BatchNorm (fast and two-pass variance), "
            "torch.nn.BatchNorm2d (NCHW and channels_last) and a bandwidth probe "
            "(jitted copy and sum of the same tensor), interleaved in one process, "
            "for eval, train forward and train forward+backward; print medians, "
            "GB/s, each time over the floor's and over jaxbn's (above 1: slower "
            "than jaxbn), page faults, compile times, and the performance targets "
            "of the shapes timed. Runs on the default JAX device (and CUDA for "
            "torch when present)."
        ),
    )
    bench.add_argument(
        "--shape", action="append", choices=list(SHAPES), help="repeatable; default all"
    )
    bench.add_argument(
        "--layout", action="append", choices=LAYOUTS, help="repeatable; default both"
    )
    bench.add_argument("--mode", action="append", choices=MODES, help="repeatable; default all")
    bench.add_argument(
        "--reps",
        type=positive_int,
        default=10,
        help="rounds of interleaved calls (default 10)",
    )
    bench.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    bench.add_argument(
        "--json", type=pathlib.Path, metavar="PATH", help="also save the timings as JSON"
    )
    bench.set_defaults(run=run)
    return bench


def run(args: argparse.Namespace) -> int:
    if args.json:
        check_output_file("--json", args.json)
    # PyTorch's OpenMP threads otherwise spin after each call and steal the
    # cores from whatever runs next; must be set before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from .. import _bench

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
        report = {
            "environment": dict(environment),
            "ratios": _bench.RATIO_CONVENTION,
            "timings": [t.to_json() for t in timings],
            "targets": _bench.targets_json(timings),
        }
        args.json.write_text(json.dumps(report, indent=2))
        print(f"timings saved to {args.json}")
    return 0
