"""The ``jaxbn`` command: ``parity``, ``convert``, ``inspect`` and ``bench``.

A mistake made at the shell never ends in a traceback: it ends in one line
on stderr, ``jaxbn: <what is wrong>; <what to type instead>``, and exit
code 2 when an argument is wrong (found before any work starts) or 1 when
the work itself fails or finds problems. A closed output pipe
(``jaxbn parity --list | head -1``) ends quietly. A traceback means a bug
in jaxbn.

Each subcommand is one ``add_*`` function in :data:`SUBCOMMANDS` that adds
its parser and sets ``run``; a new subcommand is one more such function.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import pathlib
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

USAGE = 2  # exit code: a wrong argument, found before any work
FAILURE = 1  # exit code: the work failed or found problems


class CommandError(Exception):
    """A user's mistake: ``jaxbn: {message}`` on stderr and exit ``code``."""

    def __init__(self, message: str, code: int = FAILURE) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in the ``jaxbn ...: problem; fix`` form."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(USAGE, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    >>> main(["parity", "--list", "-k", "3d/affine/momentum=0.1/float32"])
    3d/affine/momentum=0.1/float32/jit
    0
    """
    parser = build_parser()
    try:
        try:
            args, extra = parser.parse_known_args(argv)
            if extra:
                # Otherwise argparse blames the top-level parser and prints its usage.
                args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
        except SystemExit as done:  # --help, --version, or a usage error already printed
            return done.code if isinstance(done.code, int) else USAGE
        code = args.run(args)
        sys.stdout.flush()  # a closed pipe is noticed here, not at interpreter exit
        return code
    except CommandError as error:
        print(f"jaxbn: {error}", file=sys.stderr)
        return error.code
    except BrokenPipeError:
        # The reader went away (`| head`): nothing more to say, and nothing
        # left for Python to flush into the closed pipe at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + 13  # what a process killed by SIGPIPE returns
    except KeyboardInterrupt:
        print("jaxbn: interrupted", file=sys.stderr)
        return 128 + 2


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxbn", description="PyTorch-exact BatchNorm for JAX/Flax: tools.")
    parser.add_argument("--version", action="version", version=version())
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    for add in SUBCOMMANDS:
        sub = add(commands)
        sub.set_defaults(parser=sub)
    return parser


def version() -> str:
    """``jaxbn 0.1.0 (jax ..., flax ...)``, without importing any of them."""

    def of(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return f"jaxbn {of('jaxbn')} (jax {of('jax')}, flax {of('flax')}, torch {of('torch')})"


# --- arguments ---------------------------------------------------------------


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def check_input_file(path: pathlib.Path, what: str = "checkpoint") -> None:
    """Refuse a path that is not a readable file, before any work."""
    if path.is_dir():
        raise CommandError(
            f"{path} is a directory, not a {what} file; give the path of the file in it",
            USAGE,
        )
    if not path.exists():
        raise CommandError(f"{path}: no such file; check the path (ls {path.parent})", USAGE)
    if not os.access(path, os.R_OK):
        raise CommandError(f"{path}: permission denied; check its permissions (ls -l)", USAGE)


def check_output_file(flag: str, path: pathlib.Path, *inputs: pathlib.Path) -> None:
    """Refuse an output path that cannot be written, before any work."""
    if path.is_dir():
        example = path / ("model.msgpack" if flag == "-o" else "results.json")
        raise CommandError(
            f"{flag} {path} is a directory; give a file path, e.g. {flag} {example}", USAGE
        )
    parent = path.parent
    if not parent.is_dir():
        raise CommandError(
            f"{flag} {path}: directory {parent} does not exist; create it "
            f"(mkdir -p {parent}) or choose another path",
            USAGE,
        )
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise CommandError(f"{flag} {path}: permission denied; choose a writable path", USAGE)
    for given in inputs:
        if given.exists() and path.exists() and path.samefile(given):
            raise CommandError(
                f"{flag} {path} is also the input; choose another output path", USAGE
            )


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
    from .convert import LAYERS, TORCH_MODULES

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
def warnings_as_lines() -> Iterator[None]:
    """Warnings as ``jaxbn: warning: ...`` lines, without Python's source excerpt."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for warning in caught:
                print(f"jaxbn: warning: {warning.message}", file=sys.stderr)


# --- parity --------------------------------------------------------------------


def add_parity(commands: Any) -> argparse.ArgumentParser:
    parity = commands.add_parser(
        "parity",
        help="compare jaxbn with the installed torch on the built-in cases",
        description=(
            "Run every built-in parity case (layer kind x options, 10 training "
            "steps then 3 eval steps) against the installed torch and print the "
            "largest |jaxbn - torch| of the output, each gradient and each running "
            "statistic, and the tolerance it was held to. Exits 1 if any case fails."
        ),
    )
    parity.add_argument(
        "--json", type=pathlib.Path, metavar="PATH", help="also save results as JSON"
    )
    parity.add_argument("-k", metavar="TEXT", help="only cases whose name contains TEXT")
    parity.add_argument("--list", action="store_true", help="list the cases and exit")
    parity.set_defaults(run=run_parity)
    return parity


NO_TORCH = "which is not installed; install it from the checkout with: pip install -e '.[torch]'"


def run_parity(args: argparse.Namespace) -> int:
    from . import parity

    if args.json:
        check_output_file("--json", args.json)
    cases = [case for case in parity.builtin_cases() if not args.k or args.k in case.name]
    if not cases:
        raise CommandError(
            f"no case matches -k {args.k!r}; see the names with: jaxbn parity --list", USAGE
        )
    if args.list:
        print("\n".join(case.name for case in cases))
        return 0
    try:
        import torch  # noqa: F401 (only whether it is there)
    except ImportError:
        raise CommandError(f"jaxbn parity compares with PyTorch, {NO_TORCH}") from None
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
    return 0 if all(r.passed for r in results) else FAILURE


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


# --- convert and inspect -------------------------------------------------------


def add_convert(commands: Any) -> argparse.ArgumentParser:
    convert = commands.add_parser(
        "convert",
        help="convert a PyTorch checkpoint into a Flax msgpack file",
        description=(
            "Read CKPT (.pt/.pth/.bin/.ckpt without executing pickled code, or "
            ".safetensors), convert every tensor with jaxbn.from_torch, print a "
            "per-layer summary and write OUT with Flax's msgpack serialization. "
            "Strict: if any tensor is left unconverted or ambiguous, or the "
            "result does not match --template, every problem is listed, nothing "
            "is written and the exit code is 1; --partial writes what converted."
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
    convert.add_argument(
        "--partial",
        action="store_true",
        help="write what converted even when problems are listed (exit 0)",
    )
    # Strict is the default; the flag stays so that older scripts keep working.
    convert.add_argument("--strict", action="store_true", help=argparse.SUPPRESS)
    add_mapping_arguments(convert)
    convert.add_argument(
        "--saturate-counts",
        action="store_true",
        help="clamp num_batches_tracked beyond int32 instead of failing (x64 off)",
    )
    convert.set_defaults(run=run_convert)
    return convert


def add_inspect(commands: Any) -> argparse.ArgumentParser:
    inspect = commands.add_parser(
        "inspect",
        help="list a checkpoint's layers and inferred kinds without converting",
        description=(
            "List what jaxbn convert would do with CKPT: every tensor's layer kind, "
            "Flax path, shapes and layout, and every key it could not convert "
            "(then the exit code is 1). CKPT may also be a model factory, "
            "MODULE:FUNCTION (e.g. torchvision.models:mnasnet1_0), called with no "
            "arguments: the live module also shows the settings its state dict does "
            "not carry (eps, momentum, stride, ...) and the Linears that depend on "
            "the flatten order."
        ),
    )
    inspect.add_argument("checkpoint", metavar="CKPT")
    add_mapping_arguments(inspect)
    inspect.set_defaults(run=run_inspect)
    return inspect


def load_state(path: pathlib.Path) -> Mapping[str, Any]:
    """The checkpoint at ``path``, or a one-line reason it cannot be used."""
    from .convert import CheckpointError, load_checkpoint

    check_input_file(path)
    try:
        state = load_checkpoint(path)
    except CheckpointError as error:
        raise CommandError(str(error)) from None
    except ImportError:
        raise CommandError(f"{path}: reading it needs PyTorch or safetensors, {NO_TORCH}") from None
    if not isinstance(state, Mapping):
        raise CommandError(
            f"{path} holds a {type(state).__name__}, not a state dict of named tensors; "
            "save one with torch.save(model.state_dict(), path) and convert that file"
        )
    return state


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


def is_factory(spec: str) -> bool:
    """``package.module:function`` rather than a file name."""
    module, sep, function = spec.partition(":")
    return (
        bool(sep)
        and module.replace(".", "").replace("_", "").isalnum()
        and all(part.isidentifier() for part in function.split("."))
    )


def build_model(spec: str) -> Any:
    """The torch module that ``MODULE:FUNCTION`` builds, or a one-line refusal.

    ``FUNCTION`` may be a dotted attribute path, or a module instance itself.
    """
    import importlib

    module_name, _, function = spec.partition(":")
    if "" not in sys.path and os.getcwd() not in sys.path:
        # (the working directory importable, as `python -c` and `python -m` have it)
        sys.path.insert(0, os.getcwd())
    try:
        factory: Any = importlib.import_module(module_name)
        for part in function.split("."):
            factory = getattr(factory, part)
    except (ImportError, AttributeError) as error:
        raise CommandError(
            f"cannot build {spec}: {error}; check the names (python -c 'import {module_name}')",
            USAGE,
        ) from None
    is_class = isinstance(factory, type)
    try:
        model = factory if hasattr(factory, "state_dict") and not is_class else factory()
    except TypeError as error:
        what = (
            f"{spec} is a class whose constructor needs arguments ({error})"
            if is_class
            else f"cannot build {spec}: {error}"
        )
        raise CommandError(
            f"{what}; give a function that builds the model with no arguments, such as "
            "torchvision.models:resnet18",
            USAGE,
        ) from None
    if not hasattr(model, "state_dict"):
        raise CommandError(f"{spec}() returned a {type(model).__name__}, not a torch module", USAGE)
    return model


def run_convert(args: argparse.Namespace) -> int:
    from .convert import CheckpointError, from_torch, load_variables, save_variables

    kinds = parse_kinds(args.kind)
    check_output_file("-o", args.output, args.checkpoint)
    template = None
    if args.template:
        check_input_file(args.template, "template")
        try:
            template = load_variables(args.template)
        except CheckpointError as error:
            raise CommandError(
                f"--template {error}; give a file written by jaxbn.convert.save_variables"
            ) from None
    state = load_state(args.checkpoint)
    with conversion_errors(args.checkpoint), warnings_as_lines():
        variables, report = from_torch(
            state,
            template,
            strict=False,
            kinds=kinds,
            counts="saturate" if args.saturate_counts else "error",
            progress=progress_bar,
        )
    print(format_summary(report, template_given=template is not None))
    if report.problems and not args.partial:
        raise CommandError(
            f"{problem_count(report)} problem(s) listed above; nothing written to "
            f"{args.output}. Settle them (--kind PREFIX=KIND"
            + (", --template VARS" if template is None else "")
            + "), or pass --partial to write what converted"
        )
    save_variables(args.output, variables)
    partial = f", {problem_count(report)} problem(s) left out" if report.problems else ""
    print(f"\nwrote {args.output} ({len(report.entries)} arrays{partial})")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from .convert import inspect

    kinds = parse_kinds(args.kind)
    if is_factory(args.checkpoint):
        source: Any = build_model(args.checkpoint)
    else:
        source = load_state(pathlib.Path(args.checkpoint))
    with conversion_errors(args.checkpoint):
        report = inspect(source, kinds=kinds)
    print(format_summary(report, template_given=False))
    if report.problems:
        raise CommandError(
            f"{problem_count(report)} problem(s) listed above: jaxbn convert would "
            "refuse this checkpoint until they are settled"
        )
    return 0


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
    from .convert import LAYERS

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


# --- bench ---------------------------------------------------------------------


def add_bench(commands: Any) -> argparse.ArgumentParser:
    from ._bench import LAYOUTS, MODES, SHAPES

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
    bench.set_defaults(run=run_bench)
    return bench


def run_bench(args: argparse.Namespace) -> int:
    if args.json:
        check_output_file("--json", args.json)
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
        report = {
            "environment": dict(environment),
            "ratios": _bench.RATIO_CONVENTION,
            "timings": [t.to_json() for t in timings],
            "targets": _bench.targets_json(timings),
        }
        args.json.write_text(json.dumps(report, indent=2))
        print(f"timings saved to {args.json}")
    return 0


from .port._cli import add_parser as add_port  # noqa: E402  (the port's own module)

SUBCOMMANDS: tuple[Callable[[Any], argparse.ArgumentParser], ...] = (
    add_parity,
    add_convert,
    add_inspect,
    add_port,
    add_bench,
)


if __name__ == "__main__":
    raise SystemExit(main())
