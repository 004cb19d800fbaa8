"""What every subcommand shares: exit codes, the user's-mistake error, checks of
paths and arguments made before any work, and building a model from its factory."""

from __future__ import annotations

import argparse
import inspect
import os
import pathlib
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

USAGE = 2  # exit code: a wrong argument, found before any work
FAILURE = 1  # exit code: the work failed or found problems


class CommandError(Exception):
    """A user's mistake: ``jaxbn: {message}`` on stderr and exit ``code``."""

    def __init__(self, message: str, code: int = FAILURE) -> None:
        super().__init__(message)
        self.code = code


NO_TORCH = "which is not installed; install it from the checkout with: pip install -e '.[torch]'"
# torchvision and timm models too: the port extra pins a torch they are built for
NO_TORCH_PORT = (
    "which is not installed; install it with torchvision and timm from the checkout: "
    "pip install -e '.[port]'"
)


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


def load_state(path: pathlib.Path) -> Mapping[str, Any]:
    """The checkpoint at ``path``, or a one-line reason it cannot be used."""
    from ..convert import CheckpointError, load_checkpoint

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


def is_factory(spec: str) -> bool:
    """``package.module:function`` (or ``timm:NAME``) rather than a file name."""
    module, sep, function = spec.partition(":")
    return (
        bool(sep)
        and module.replace(".", "").replace("_", "").isalnum()
        and all(part.isidentifier() for part in function.split("."))
    )


def parse_kwargs(text: str | None) -> dict[str, Any]:
    """``--kwargs 'num_classes=10, in_chans=1'`` as keyword arguments: Python literals,
    or a bare word as a string (``act_layer=gelu``).

    >>> parse_kwargs("num_classes=10, variant=b0, size=(224, 224), bias=False")
    {'num_classes': 10, 'variant': 'b0', 'size': (224, 224), 'bias': False}
    """
    import ast

    if not text:
        return {}
    try:
        call = ast.parse(f"f({text})", mode="eval").body
    except SyntaxError:
        call = None
    if not isinstance(call, ast.Call) or call.args or not call.keywords:
        raise CommandError(
            f"--kwargs expects NAME=VALUE pairs separated by commas, got {text!r}; "
            "e.g. --kwargs num_classes=10,in_chans=1",
            USAGE,
        )
    kwargs = {}
    for keyword in call.keywords:
        if keyword.arg is None:
            raise CommandError(f"--kwargs: NAME=VALUE pairs only, got {text!r}", USAGE)
        value = keyword.value
        if isinstance(value, ast.Name) and value.id not in ("True", "False", "None"):
            kwargs[keyword.arg] = value.id
            continue
        try:
            kwargs[keyword.arg] = ast.literal_eval(value)
        except (ValueError, TypeError, SyntaxError, RecursionError):
            raise CommandError(
                f"--kwargs {keyword.arg}={ast.unparse(value)}: the value must be a Python "
                "literal (a number, a quoted string, a tuple, True, None) or a bare word",
                USAGE,
            ) from None
    return kwargs


def build_model(spec: str, kwargs: Mapping[str, Any] | None = None) -> Any:
    """The torch module that ``MODULE:FUNCTION`` builds (with ``kwargs``), or a one-line
    refusal. ``timm:NAME`` is ``timm.create_model(NAME, pretrained=False, **kwargs)``.

    ``FUNCTION`` may be a dotted attribute path, a class, or a module instance itself.
    """
    import importlib

    kwargs = dict(kwargs or {})
    module_name, _, function = spec.partition(":")
    if "" not in sys.path and os.getcwd() not in sys.path:
        # (the working directory importable, as `python -c` and `python -m` have it)
        sys.path.insert(0, os.getcwd())
    if module_name == "timm":
        return _timm_model(function, kwargs)
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
    if hasattr(factory, "state_dict") and not is_class:
        if kwargs:
            raise CommandError(
                f"{spec} is a module already built; --kwargs needs a function or class", USAGE
            )
        return factory
    if not callable(factory):
        raise CommandError(
            f"{spec} is a {type(factory).__name__}, not a function or class that builds a "
            "model; name one such as torchvision.models:resnet18",
            USAGE,
        )
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as error:
        what = f"{spec} is a class whose constructor" if is_class else f"{spec}"
        raise CommandError(
            f"{what} takes other arguments ({error}); give them with --kwargs "
            "NAME=VALUE,... or name a function that builds the model, such as "
            "torchvision.models:resnet18",
            USAGE,
        ) from None
    except ValueError:  # (a builtin without a signature: the call says)
        pass
    return _built(spec, lambda: factory(**kwargs), kwargs)


def _built(spec: str, build: Any, kwargs: Mapping[str, Any]) -> Any:
    """``build()``'s torch module, or one line on what the factory raised (exit 1)."""
    try:
        model = build()
    except Exception as error:  # the factory's own code: its message, not our traceback
        if isinstance(error, TypeError) and kwargs and "argument" in str(error):
            # (an argument passed on, **kwargs, to a constructor that does not take it)
            raise CommandError(
                f"cannot build {spec} with --kwargs {_shown(kwargs)}: {error}; give the "
                "arguments it takes",
                USAGE,
            ) from None
        check = f"; check --kwargs {_shown(kwargs)}" if kwargs else ""
        raise CommandError(f"cannot build {spec}: {type(error).__name__}: {error}{check}") from None
    if not hasattr(model, "state_dict"):
        raise CommandError(
            f"{spec} built an object of type {type(model).__name__}, not a torch module; "
            "name a function or class that returns a torch.nn.Module",
            USAGE,
        )
    return model


def _shown(kwargs: Mapping[str, Any]) -> str:
    return ",".join(f"{name}={value!r}" for name, value in kwargs.items())


def _timm_model(name: str, kwargs: dict[str, Any]) -> Any:
    try:
        import timm
    except ImportError:
        raise CommandError(
            "timm:NAME builds a timm model, and timm is not installed; install the port "
            "extra from the checkout: pip install -e '.[port]'",
            USAGE,
        ) from None
    if not timm.is_model(name):
        raise CommandError(
            f"timm has no model {name!r}; name one as timm:NAME, e.g. timm:resnet18 "
            f"(list them: python -c \"import timm; print(timm.list_models('resnet*'))\")",
            USAGE,
        )
    return _built(
        f"timm:{name}", lambda: timm.create_model(name, pretrained=False, **kwargs), kwargs
    )


class Phases:
    """``[  12 s] tracing ...`` on stderr, the seconds counting while a long step runs,
    then one line per finished phase; silent when stderr is not a terminal."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.on = self.stream.isatty()
        self.start = time.monotonic()

    @contextmanager
    def __call__(self, what: str) -> Iterator[None]:
        if not self.on:
            yield
            return
        began = time.monotonic()
        done = threading.Event()

        def tick() -> None:
            while not done.wait(1.0):
                self._line(f"{what} ...", end="")

        self._line(f"{what} ...", end="")
        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        ended = "stopped after "  # unless the phase finishes
        try:
            yield
            ended = ""
        finally:
            done.set()
            ticker.join()
            self._line(f"{what}: {ended}{time.monotonic() - began:.1f} s")

    def _line(self, text: str, end: str = "\n") -> None:
        elapsed = time.monotonic() - self.start
        print(f"\r\033[K[{elapsed:4.0f} s] {text}", end=end, file=self.stream, flush=True)
