"""``jaxbn port MODULE:FACTORY --input 1,3,224,224``: port, prove it, save it."""

from __future__ import annotations

import argparse
import pathlib
from collections.abc import Mapping
from typing import Any

from ._common import (
    FAILURE,
    NO_TORCH_PORT,
    USAGE,
    CommandError,
    Phases,
    build_model,
    check_input_file,
    check_output_file,
    is_factory,
    load_state,
    parse_kwargs,
    warnings_as_lines,
)


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the ``port`` subcommand to ``jaxbn``'s subparsers."""
    parser = commands.add_parser(
        "port",
        help="port a torch model to Flax and check it layer by layer",
        description=(
            "Build the torch model MODULE:FACTORY (e.g. torchvision.models:resnet50, "
            "called with --kwargs or no arguments, so torchvision builds weights=None; "
            "timm:NAME is timm.create_model(NAME)), load --checkpoint if given "
            "(strictly, read as jaxbn convert reads it), port it with jaxbn.port, and "
            "compare torch and the port layer by layer on a random input of shape "
            "--input (N,C,H,W: PyTorch's layout): in eval, and in one training step "
            "(outputs, every parameter gradient and running statistic; dropout "
            "probabilities set to 0, as random masks differ), each against torch in "
            "float64 next to torch's own float32. Prints the first divergence and "
            "exits 1 if there is one. -o DIR saves the port to a directory (generated "
            "Flax source, variables, metadata) that jaxbn.port.load reads where torch "
            "is not installed; -o FILE.msgpack writes the variables alone (the same, "
            "bit for bit, as jaxbn convert writes from the checkpoint); --export FILE "
            "the exported eval and training programs (jax alone runs them). On a "
            "terminal, each phase and its time is shown on stderr."
        ),
    )
    parser.add_argument("model", metavar="MODULE:FACTORY|timm:NAME")
    parser.add_argument(
        "--input",
        required=True,
        metavar="N,C,H,W",
        help="input shape in PyTorch's layout (channels second), e.g. 1,3,224,224",
    )
    parser.add_argument(
        "--kwargs",
        metavar="NAME=VALUE,...",
        help="arguments for the factory, e.g. --kwargs num_classes=10 (Python literals, "
        "or bare words as strings)",
    )
    parser.add_argument("--checkpoint", type=pathlib.Path, metavar="FILE")
    parser.add_argument(
        "-o",
        "--output",
        type=pathlib.Path,
        metavar="DIR|FILE.msgpack",
        help="a directory to save the port to (model.py, variables.msgpack, port.json; "
        "load it with jaxbn.port.load), or a .msgpack file for the variables alone",
    )
    parser.add_argument(
        "--export",
        type=pathlib.Path,
        metavar="FILE",
        help="write the eval function and the training step as jax.export programs "
        "(any batch size) with the variables; needs flatbuffers: pip install -e '.[export]'",
    )
    parser.add_argument(
        "--no-check",
        action="store_true",
        help="port and write (-o, --export) without comparing with torch: minutes less "
        "on a large model",
    )
    parser.add_argument(
        "--factor",
        type=float,
        default=8.0,
        help="torch also runs in float64 as the reference; a tensor passes when its "
        "error (relative to its largest value) is within FACTOR times the worst that "
        "torch's own float32 run makes on a tensor of its kind (default 8; rounding "
        "alone moves deep nets' float32 gradients by 1e-2)",
    )
    parser.add_argument(
        "--rtol",
        type=float,
        default=2e-6,
        help="plus this much of each tensor's largest value (default 2e-6)",
    )
    parser.add_argument("--atol", type=float, default=0.0, help="plus this (default 0)")
    parser.add_argument("--table", action="store_true", help="print every row of the reports")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds torch before the model is built (its initial weights, unless "
        "--checkpoint replaces them) and the random input (default 0)",
    )
    parser.set_defaults(run=run)
    return parser


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(n <= 0 for n in shape):
        raise CommandError(
            f"--input expects positive integers like 1,3,224,224, got {text!r}", USAGE
        )
    return shape


def _check_arguments(args: argparse.Namespace) -> None:
    """Every mistake that needs no work found first (a port and its check take minutes)."""
    if not is_factory(args.model):
        raise CommandError(
            "expected MODULE:FACTORY such as torchvision.models:resnet18, or timm:NAME "
            f"such as timm:resnet18, got {args.model!r}",
            USAGE,
        )
    if args.checkpoint is not None:
        check_input_file(args.checkpoint)
    if args.output is not None and args.output.suffix == ".msgpack":
        check_output_file("-o", args.output, *filter(None, [args.checkpoint]))
    elif args.output is not None:
        _check_directory(args.output)
    if args.export is not None:
        check_output_file("--export", args.export, *filter(None, [args.checkpoint]))
        try:
            import flatbuffers  # noqa: F401  (jax.export's serialisation)
        except ImportError:
            raise CommandError(
                "--export needs flatbuffers to write jax.export programs: "
                "pip install -e '.[export]' (or '.[port]', which includes it)",
                USAGE,
            ) from None
    if args.no_check and args.output is None and args.export is None:
        raise CommandError(
            "--no-check ports without comparing, so it needs somewhere to write: "
            "-o DIR, -o FILE.msgpack or --export FILE",
            USAGE,
        )


def run(args: argparse.Namespace) -> int:
    shape = _shape(args.input)
    kwargs = parse_kwargs(args.kwargs)
    _check_arguments(args)
    with warnings_as_lines():  # (torch's and jax's warnings, after the phase lines)
        return _port(args, shape, kwargs, Phases())


def _port(
    args: argparse.Namespace, shape: tuple[int, ...], kwargs: dict[str, Any], phase: Phases
) -> int:
    with phase("importing torch"):
        try:
            import numpy as np
            import torch
        except ImportError:
            raise CommandError(f"jaxbn port reads a PyTorch model, {NO_TORCH_PORT}") from None

    # The same command, the same report: the factory's random init is seeded.
    torch.manual_seed(args.seed)
    with phase(f"building {args.model}"):
        model = build_model(args.model, kwargs)

    from ..convert import save_variables
    from ..parity import compare_models
    from ..port import PortError, port, without_dropout

    if args.checkpoint is not None:
        with phase(f"loading {args.checkpoint}"):
            notes = _load_checkpoint(model, args.checkpoint, args.model)
        for note in notes:
            print(f"{args.checkpoint}: {note}")
    x = np.random.default_rng(args.seed).standard_normal(shape).astype(np.float32)
    # Compare with dropout off: torch's and JAX's random masks cannot agree.
    quiet = without_dropout(model)
    with phase("running torch on the input"):
        _fits(quiet, x, args, train=False)
        if not args.no_check:  # (a copy: a training step moves the running statistics)
            _fits(without_dropout(quiet), x, args, train=True)
    try:
        with phase("tracing and porting"):
            ported = port(model, torch.from_numpy(x))
            checked = ported if args.no_check else port(quiet, torch.from_numpy(x))
    except PortError as error:
        raise CommandError(str(error).removeprefix("jaxbn.port: ")) from None
    print(f"ported {args.model}: {_count(ported.variables)}")
    failed = False
    for train in () if args.no_check else (False, True):
        mode = "training step" if train else "eval"
        try:
            with phase(f"{mode}: torch in float32 and float64, the port compiled and run"):
                report = compare_models(
                    quiet,
                    checked.module,
                    checked.variables,
                    x,
                    train=train,
                    flax_kwargs={"train": train},
                    gradients=train,
                    rtol=args.rtol,
                    atol=args.atol,
                    reference="float64",
                    factor=args.factor,
                )
        except Exception as error:  # e.g. an output structure the harness cannot compare
            raise CommandError(
                f"the {mode} comparison could not run: {type(error).__name__}: {error}"
            ) from None
        print(f"\n{mode}: {report.summary()}")
        if args.table or not report.ok:
            rows = report.table().splitlines()
            print("\n".join(rows if args.table else _around_first(rows)))
        failed |= not report.ok
    if args.output is not None and args.output.suffix == ".msgpack":
        save_variables(args.output, ported.variables)
        print(f"\nwrote {args.output}")
    elif args.output is not None:
        try:
            with phase("writing the source"):
                ported.save(args.output)
        except PortError as error:  # (source the port cannot write: a converter of one's own)
            raise CommandError(str(error).removeprefix("jaxbn.port: ")) from None
        print(f"\nsaved the port to {args.output}/ (model.py, variables.msgpack, port.json)")
    if args.export is not None:
        try:
            with phase("exporting"):
                ported.export(args.export)
        except PortError as error:
            raise CommandError(str(error).removeprefix("jaxbn.port: ")) from None
        print(f"\nwrote {args.export} (eval and training programs, any batch size)")
    if args.no_check:
        print("\nnot compared with torch (--no-check)")
    return FAILURE if failed else 0


def _load_checkpoint(model: Any, path: pathlib.Path, spec: str) -> tuple[str, ...]:
    """The checkpoint into ``model``, read as ``jaxbn convert`` reads it (a wrapper dict
    around the state dict, DDP's prefix), or one line on what does not fit; returns
    what the reader noted (the wrapper it used)."""
    from ..convert._plan import unwrap

    state = load_state(path)
    try:
        source = unwrap(state, "jaxbn port")
    except TypeError as error:
        raise CommandError(f"{path}: {error}") from None
    misfit = _misfit(source.state, model.state_dict())
    if misfit:
        raise CommandError(
            f"{path} does not fit {spec}: {misfit}; build the checkpoint's architecture "
            "(its number of classes, its variant: --kwargs num_classes=...)"
        )
    try:
        model.load_state_dict(source.state, strict=True)
    except RuntimeError as error:
        raise CommandError(f"{path} does not fit {spec}: {str(error).splitlines()[0]}") from None
    return source.notes


def _fits(model: Any, x: Any, args: argparse.Namespace, *, train: bool) -> None:
    """Run torch's forward once on the input (in eval, or in training on a copy): an
    input torch refuses is the user's mistake, one line naming the layout the model's
    first layer expects (exit 2); so is one on which a training step cannot run (a
    BatchNorm of one value per channel, in an auxiliary head too)."""
    import torch

    names = {id(m): name for name, m in model.named_modules()}
    entered: list[Any] = []  # modules whose forward runs, innermost last
    first: list[Any] = []  # the first leaf with weights and a channel count, as they run

    def enter(module: Any, inputs: Any) -> None:
        entered.append(module)
        if not first and _channels(module) is not None and not any(module.children()):
            first.append(module)

    def leave(module: Any, inputs: Any, output: Any) -> None:
        entered.pop()

    handles = [m.register_forward_pre_hook(enter) for m in model.modules()]
    handles += [m.register_forward_hook(leave) for m in model.modules()]
    mode = model.training
    model.train(train)
    try:
        with torch.no_grad():
            model(torch.from_numpy(x))
    except Exception as error:
        where = entered[-1] if entered else model
        name = names.get(id(where)) or "the model"
        said = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CommandError(
            _refusal(args, name, where, said, x.shape, first, train, entered), USAGE
        ) from None
    finally:
        for handle in handles:
            handle.remove()
        model.train(mode)


def _refusal(
    args: argparse.Namespace,
    name: str,
    where: Any,
    said: str,
    shape: tuple[int, ...],
    first: list[Any],
    train: bool,
    entered: list[Any],
) -> str:
    """One line on an input torch's own forward refuses, with the --input to try."""
    if len(entered) <= 1 and "required positional argument" in said:
        return (
            f"{args.model} takes more than one input ({said}); jaxbn port feeds it one "
            "random tensor of --input's shape: port it from Python, jaxbn.port(model, "
            "(x, y)) (help(jaxbn.port))"
        )
    if train and "more than 1 value per channel" in said:
        bigger = ",".join(map(str, (max(2, shape[0]), *shape[1:])))
        return (
            f"--input {args.input}: in a training step {name} would normalise 1 value per "
            'channel, which torch refuses ("Expected more than 1 value per channel when '
            f'training"); give a larger batch or size (--input {bigger}), or --no-check'
        )
    return (
        f"--input {args.input} does not fit {args.model}: torch's own forward fails in "
        f"{name} ({type(where).__name__}): {said}{_shape_hint(shape, first)}"
    )


def _channels(module: Any) -> int | None:
    for name in ("in_channels", "num_features", "in_features"):
        value = getattr(module, name, None)
        if isinstance(value, int):
            return value
    return None


def _shape_hint(shape: tuple[int, ...], first: list[Any]) -> str:
    """What the model's first layer expects, next to the shape given."""
    if not first:
        return ""
    layer = first[0]
    channels = _channels(layer)
    weight = getattr(layer, "weight", None)
    dims = weight.dim() if weight is not None and "Conv" in type(layer).__name__ else None
    described = f"its first layer {type(layer).__name__} takes {channels} channels at axis 1"
    if len(shape) >= 3 and shape[-1] == channels != shape[1]:
        nchw = (shape[0], shape[-1], *shape[1 : len(shape) - 1])
        return (
            f"; {described} (N,C,H,W: PyTorch's layout), and this shape looks channels-last: "
            f"--input {','.join(map(str, nchw))}"
        )
    if dims is not None and len(shape) == dims - 1 and shape[:1] == (channels,):
        return (
            f"; its first layer ({type(layer).__name__}, {channels} channels) needs a batch "
            f"dimension first: --input 1,{','.join(map(str, shape))}"
        )
    return f"; {described}"


def _check_directory(path: pathlib.Path) -> None:
    """Refuse a directory -o cannot save a port to, before any work."""
    from ..port import PortError
    from ..port._saved import check_directory

    try:
        check_directory(path)
    except PortError as error:
        message = str(error).removeprefix("jaxbn.port: ")
        if message.endswith("is a file; save a port to a directory"):
            message += ", or the variables alone to FILE.msgpack"
        raise CommandError(f"-o {message}", USAGE) from None


def _misfit(state: Mapping[str, Any], expected: Mapping[str, Any], few: int = 3) -> str:
    """One line for a checkpoint whose keys or shapes are not the model's ('' if they
    are), naming a few of each: torch's own message lists every key."""
    # (torch's BatchNorm fills a missing num_batches_tracked in, as checkpoints saved
    # before it existed lack it: load_state_dict(strict=True) accepts them)
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {list(state[k].shape)}, model {list(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    parts = [
        f"{len(found)} {what} ({', '.join(found[:few])}{', ...' if len(found) > few else ''})"
        for what, found in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("of another shape", shapes),
        )
        if found
    ]
    return "keys: " + "; ".join(parts) if parts else ""


def _count(variables: dict[str, Any]) -> str:
    import jax

    parts = []
    for collection, tree in variables.items():
        leaves = jax.tree.leaves(tree)
        parts.append(
            f"{collection} {len(leaves)} arrays, {sum(leaf.size for leaf in leaves):,} values"
        )
    return "; ".join(parts)


def _around_first(rows: list[str]) -> list[str]:
    """The header, a few rows before the first divergence, and a few after."""
    at = next((i for i, row in enumerate(rows) if "first divergence" in row), None)
    if at is None:
        return rows[:1] + [row for row in rows[1:] if "FAIL" in row][:10]
    return rows[:1] + rows[max(1, at - 3) : at + 4]
