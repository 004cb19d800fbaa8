"""The catalogue sweep: ``jaxbn.port`` on timm's and torchvision's models, each checked
against torch in eval and in one training step.

    python benchmarks/port_sweep.py [--per-family 1] [--limit 30e6] [--only SPEC ...]

The catalogue: the ``--per-family`` smallest models of each of timm's
families (its model modules), up to ``--limit`` parameters (``--per-family
0``: every model under the limit), and every torchvision model of every task
(listed, and not run, over the limit)
(classification, segmentation, video, optical flow, the quantizable ones in
float, the detection backbones; whole detectors are left out: their
non-maximum suppression has data-dependent shapes, which a compiled program
cannot have). Models without BatchNorm are counted too.

Each model runs in a process of its own (a crash or a timeout is one row):
built with random weights (``weights=None``), BatchNorm weights and
statistics randomised and dropout off (:func:`jaxbn.parity.randomized`), on
the smallest input of 64x64, 128x128 and the model's own size that torch
accepts (timm models are also tried with ``img_size=64``), batch 4 (2 from
128x128 up); then ported and compared with :func:`jaxbn.parity.compare_models`
against a float64 torch run, next to torch's own float32 error, as the suite
does. Results go to ``benchmarks/port_sweep.jsonl`` (one line a model; a
rerun skips the models already there) and the table with its totals to
``benchmarks/port_sweep.md``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

HERE = pathlib.Path(__file__).parent
RESULTS = HERE / "port_sweep.jsonl"
TABLE = HERE / "port_sweep.md"
QUANTITIES = ("eval output", "training output", "running statistics", "gradients")
FACTOR, FLOOR = 8.0, 2e-6  # as the suite's model rows


# --- the catalogue -------------------------------------------------------------------


def _parameters(build: Callable[[], Any]) -> int:
    """A model's parameter count, built on the meta device (no memory, no init) where it
    can be (torchvision's RegNets read their init), else on the CPU; -1 if it cannot be."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for device in ("meta", "cpu"):
            try:
                with torch.device(device):
                    return sum(p.numel() for p in build().parameters())
            except Exception:
                continue
    return -1


def timm_catalogue(per_family: int, limit: float) -> Iterator[tuple[str, int]]:
    import timm

    for family in timm.list_modules():
        sized = []
        # (timm's test_* models are tiny stand-ins for its unit tests, not architectures)
        for name in timm.list_models(module=family, exclude_filters=["test_*"]):
            # (-1: a model that cannot be built at all, tried and listed so)
            count = _parameters(lambda name=name: timm.create_model(name, pretrained=False))
            if count <= limit:
                sized.append((count, name))
        sized.sort()
        for count, name in sized[: per_family or None]:
            yield f"timm:{name}", count


TORCHVISION_TASKS = ("", "segmentation", "video", "optical_flow", "quantization")


def torchvision_catalogue() -> Iterator[tuple[str, int]]:
    import torchvision

    for task in TORCHVISION_TASKS:
        module = getattr(torchvision.models, task) if task else torchvision.models
        for name in torchvision.models.list_models(module=module):
            spec = f"torchvision{'.' + task if task else ''}:{name}"
            yield spec, _parameters(lambda spec=spec: build(spec))
    for name in ("resnet18_fpn", "mobilenet_v3_large_fpn"):
        spec = f"torchvision.detection_backbone:{name}"
        yield spec, _parameters(lambda spec=spec: build(spec))


def build(spec: str, **options: Any) -> Any:
    """The model a spec names, with random weights."""
    import torchvision

    source, _, name = spec.partition(":")
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=False, **options)
    if source == "torchvision.detection_backbone":
        from torchvision.models.detection import backbone_utils

        if name == "resnet18_fpn":
            return backbone_utils.resnet_fpn_backbone(backbone_name="resnet18", weights=None)
        return backbone_utils.mobilenet_backbone(
            backbone_name="mobilenet_v3_large", weights=None, fpn=True
        )
    task = source.partition(".")[2]
    kwargs: dict[str, Any] = {"weights": None}
    if task == "segmentation":
        kwargs["weights_backbone"] = None
    if task == "quantization":
        kwargs["quantize"] = False
    if name in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = False
    # (by the registered name: the quantizable models are `quantized_*` there)
    return torchvision.models.get_model(name, **kwargs)


# --- one model ---------------------------------------------------------------------


def inputs_to_try(spec: str) -> Iterator[tuple[dict[str, Any], list[tuple[int, ...]]]]:
    """(build options, input shapes), smallest first."""
    if spec.startswith("torchvision.video:"):
        yield {}, [(2, 3, 4, 32, 32)]
        yield {}, [(2, 3, 16, 64, 64)]
        yield {}, [(2, 3, 16, 112, 112)]
        yield {}, [(2, 3, 14, 224, 224)]  # S3D's last pool
        return
    if spec.startswith("torchvision.optical_flow:"):
        yield {}, [(2, 3, 128, 128), (2, 3, 128, 128)]
        return
    yield {}, [(4, 3, 64, 64)]
    if spec.startswith("timm:"):
        yield {"img_size": 64}, [(4, 3, 64, 64)]
    yield {}, [(2, 3, 128, 128)]
    if spec.startswith("timm:"):
        import timm

        model: Any = timm.create_model(spec[5:], pretrained=False)
        size = model.pretrained_cfg["input_size"]
        yield {}, [(2, *size)]
    yield {}, [(2, 3, 224, 224)]
    yield {}, [(2, 3, 299, 299)]


def _missing(message: str) -> list[str]:
    """What a PortError says has no port: module classes, functions, methods, FX's reason."""
    found = []
    for line in message.splitlines():
        for pattern in (
            r"module ([\w.]+) has no converter",
            r"function ([\w.<>]+) has no converter",
            r"tensor method (\.\w+\(\)) has no converter",
            r": ([^:]*has no port[^;(]*)",
            r"(F\.\w+[^;]*?) (?:updates|is not supported)",
            r"(same tensor under two names)",
            r"(variables differ from what jaxbn.from_torch makes)",
            r"(reads '\w+', which .* changed in place through another view)",
        ):
            found += re.findall(pattern, line)
        if line.startswith("torch.fx cannot trace"):
            found.append("fx: " + line.split(": ", 2)[-1][:160])
    return list(dict.fromkeys(found))


def check(spec: str) -> dict[str, Any]:
    """Build, port and compare one model; a dict of what happened (a line of the JSONL)."""
    import numpy as np
    import torch

    import jaxbn
    from jaxbn.parity import compare_models, randomized
    from jaxbn.port import PortError

    warnings.simplefilter("ignore")
    result: dict[str, Any] = {"model": spec}
    start = time.perf_counter()
    tried = []
    for options, shapes in inputs_to_try(spec):
        try:
            model = build(spec, **options)
            with torch.no_grad():  # (both modes: Inception's auxiliary head needs 299x299)
                for training in (False, True):
                    model.train(training)(*(torch.randn(s) for s in shapes))
        except Exception as error:
            tried.append(f"{shapes}: {type(error).__name__}")
            continue
        break
    else:
        return {**result, "outcome": "torch fails", "detail": "; ".join(tried)[:300]}
    result["input"] = " + ".join("x".join(map(str, s)) for s in shapes) + (
        f" (img_size={options['img_size']})" if options else ""
    )
    result["batch_norm"] = any(
        getattr(m, "running_mean", None) is not None for m in model.modules()
    )
    torch.manual_seed(0)
    model = randomized(build(spec, **options))
    xs: tuple[Any, ...] = tuple(
        np.random.default_rng(i).standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)
    )
    x = xs[0] if len(xs) == 1 else xs
    try:
        ported = jaxbn.port(model, x)
    except PortError as error:
        missing = _missing(str(error))
        return {**result, "outcome": "port error", "detail": "; ".join(missing)[:400]}
    except Exception as error:
        return {**result, "outcome": "crash", "detail": f"{type(error).__name__}: {error}"[:400]}
    result["port_s"] = round(time.perf_counter() - start, 1)
    worst: dict[str, list[float]] = {q: [0.0, 0.0] for q in QUANTITIES}
    failures = []
    reference = "float64"
    try:
        for train in (False, True):
            try:
                report = compare_models(
                    model, ported.module, ported.variables, x, train=train,
                    flax_kwargs={"train": train}, gradients=train,
                    reference=reference, factor=FACTOR, rtol=FLOOR, atol=0.0,
                )  # fmt: skip
            except RuntimeError:  # a model that will not run in float64 (RAFT's .float())
                reference = "same"
                report = compare_models(
                    model, ported.module, ported.variables, x, train=train,
                    flax_kwargs={"train": train}, gradients=train, rtol=1e-4, atol=1e-5,
                )  # fmt: skip
            for kind, errors in report.worst().items():
                quantity = (
                    kind if kind != "output" else ("training output" if train else "eval output")
                )
                worst[quantity] = [max(a, b) for a, b in zip(worst[quantity], errors, strict=True)]
            failures += [f"{r.layer or '<output>'} {r.quantity}" for r in report.rows if not r.ok]
    except Exception as error:
        return {**result, "outcome": "crash", "detail": f"{type(error).__name__}: {error}"[:400]}
    result["errors"] = {q: [float(f"{a:.2g}"), float(f"{b:.2g}")] for q, (a, b) in worst.items()}
    result["outcome"] = "matches" if not failures else "differs"
    if reference == "same":
        result["detail"] = "against torch float32 (the model does not run in float64)"
    if failures:
        result["detail"] = f"{len(failures)} beyond the bar, first {failures[0]}"
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


# --- the whole sweep ---------------------------------------------------------------


def table(results: list[dict[str, Any]], command: str) -> str:
    import jax
    import timm
    import torch
    import torchvision

    outcomes = ("matches", "differs", "port error", "crash", "torch fails", "timeout", "not run")
    lines = [
        "# jaxbn.port catalogue sweep",
        "",
        f"`{command}`, with timm {timm.__version__}, torchvision {torchvision.__version__}, "
        f"torch {torch.__version__}, jax {jax.__version__} on the CPU ({time.strftime('%Y-%m-%d')}; "
        "models run at different commits of jaxbn as it grew: each row is its model's last run).",
        "",
    ]
    for source in ("timm", "torchvision"):
        rows = [r for r in results if r["model"].startswith(source)]
        for bn in (True, False, None):  # (None: not built, so not known)
            group = [r for r in rows if r.get("batch_norm") is bn]
            counts = collections.Counter(r["outcome"] for r in group)
            summary = ", ".join(f"{counts[o]} {o}" for o in outcomes if counts[o])
            what = {True: "with BatchNorm", False: "without BatchNorm", None: "not built"}[bn]
            if group:
                lines.append(f"- {source}, {what}: {len(group)} models: {summary}")
    lines += [
        "",
        "Errors: the worst tensor's distance from a float64 torch run, relative to its "
        "largest value, jax float32 / torch float32.",
        "",
        "| model | params | BN | input | outcome | eval output | training output "
        "| running statistics | gradients | missing, or first divergence |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        errors = r.get("errors", {})
        cells = [
            r["model"],
            f"{r.get('params', 0) / 1e6:.1f}M",
            "?" if r.get("batch_norm") is None else ("yes" if r["batch_norm"] else "no"),
            r.get("input", ""),
            r["outcome"],
            *(
                f"{errors[q][0]:.1e} / {errors[q][1]:.1e}" if q in errors else ""
                for q in QUANTITIES
            ),
            r.get("detail", "").replace("|", "/"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--per-family", type=int, default=1)
    parser.add_argument("--limit", type=float, default=30e6, help="parameters (default 30e6)")
    parser.add_argument("--only", nargs="*", help="these specs (timm:NAME, torchvision:NAME)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds a model")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one spec in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(check(args.one)), flush=True)
        return
    done = {}
    if RESULTS.exists():
        done = {r["model"]: r for r in map(json.loads, RESULTS.read_text().splitlines())}
    if args.only:
        catalogue = [(spec, _parameters(lambda spec=spec: build(spec))) for spec in args.only]
    else:
        catalogue = [*timm_catalogue(args.per_family, args.limit), *torchvision_catalogue()]
    print(f"{len(catalogue)} models, {sum(spec in done for spec, _ in catalogue)} done", flush=True)
    for spec, count in catalogue:
        if spec in done:
            continue
        if count > args.limit:
            result = {"model": spec, "outcome": "not run", "detail": "over --limit"}
            result["params"] = count
            done[spec] = result
            with RESULTS.open("a") as file:
                file.write(json.dumps(result) + "\n")
            continue
        try:
            out = subprocess.run(
                [sys.executable, __file__, "--one", spec],
                capture_output=True, text=True, timeout=args.timeout,
                env={**os.environ, "PYTHONWARNINGS": "ignore"},
            )  # fmt: skip
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            result = json.loads(lines[-1]) if lines else {
                "model": spec, "outcome": "crash", "detail": out.stderr.strip()[-300:],
            }  # fmt: skip
        except subprocess.TimeoutExpired:
            result = {"model": spec, "outcome": "timeout", "detail": f"over {args.timeout:g} s"}
        result["params"] = count
        done[spec] = result
        with RESULTS.open("a") as file:
            file.write(json.dumps(result) + "\n")
        print(f"{spec}: {result['outcome']} {result.get('detail', '')[:120]}", flush=True)
    order = [spec for spec, _ in catalogue]
    ordered = [done[s] for s in order if s in done] + [r for s, r in done.items() if s not in order]
    TABLE.write_text(
        table(ordered, shlex.join(["python", "benchmarks/port_sweep.py", *sys.argv[1:]]))
    )


if __name__ == "__main__":
    main()
