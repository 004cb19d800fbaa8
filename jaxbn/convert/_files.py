"""Checkpoint files: safe loading of PyTorch's, Flax msgpack for ours."""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import serialization
from flax.core import unfreeze

from .._torch import import_torch

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read; the message names the file."""


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a PyTorch checkpoint without executing any pickled code.

    ``.pt``/``.pth``/``.bin``/``.ckpt`` files are read with
    ``torch.load(weights_only=True, mmap=True)``; ``.safetensors`` files with
    the safetensors package. The result is what the file holds (a state
    dict, or a checkpoint dict around one); pass it to
    :func:`jaxbn.from_torch`.

    Raises:
      CheckpointError: the file is missing, empty, truncated, corrupt, of an
        unknown type, or holds pickled Python objects such as a whole
        ``nn.Module`` (which only a trusted ``torch.load(weights_only=False)``
        could rebuild).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes)")
    if path.endswith(".safetensors"):
        return _load_safetensors(path)
    if not path.endswith(TORCH_SUFFIXES):
        raise CheckpointError(
            f"{path}: unknown checkpoint type; expected one of "
            f"{', '.join((*TORCH_SUFFIXES, '.safetensors'))}"
        )
    torch = import_torch()
    try:
        with warnings.catch_warnings():
            # The file is refused anyway if torch's safe unpickler cannot read it.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(
                path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
            )
    except pickle.UnpicklingError as error:
        detail = _unpickler_detail(str(error))
        if "Unsupported global" in detail:
            raise CheckpointError(
                f"{path}: holds pickled Python objects (for example a whole nn.Module), "
                "which jaxbn never executes. In the environment that saved it, save "
                f"the weights instead: torch.save(model.state_dict(), path). ({detail})"
            ) from error
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
            f"torch's safe unpickler refused it ({detail})"
        ) from error
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as error:
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no details'}"
        ) from error


def _unpickler_detail(message: str) -> str:
    """The one line of torch's long weights_only message that says what failed."""
    start = message.find("WeightsUnpickler error:")
    if start < 0:
        return message.splitlines()[0] if message else "no details"
    detail = message[start:].removeprefix("WeightsUnpickler error:").strip()
    return " ".join(detail.split(".")[0].split())


def _load_safetensors(path: str) -> dict[str, Any]:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError as error:
        raise ImportError(
            "reading .safetensors needs the safetensors package: pip install 'jaxbn[torch]'"
        ) from error
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file: {error}") from error


def save_variables(path: str | os.PathLike[str], variables: Mapping[str, Any]) -> None:
    """Write a Flax variable tree with Flax's msgpack serialization.

    dtypes, bfloat16 included, and every bit are preserved;
    :func:`load_variables` gives the identical tree back.
    """
    with open(path, "wb") as file:
        file.write(serialization.msgpack_serialize(unfreeze(dict(variables))))


def load_variables(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a tree written by :func:`save_variables` (numpy arrays)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as file:
            tree = serialization.msgpack_restore(file.read())
    except FileNotFoundError as error:
        raise CheckpointError(f"{path}: no such file") from error
    except Exception as error:
        raise CheckpointError(f"{path}: not a Flax msgpack file: {error}") from error
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path}: holds a {type(tree).__name__}, not a variable tree")
    return {key: _as_arrays(value) for key, value in tree.items()}


def _as_arrays(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {key: _as_arrays(value) for key, value in tree.items()}
    return np.asarray(tree)
