"""Pickle checkpoints (.ckpt/.pt/.pth/.bin), read only when the user asks and only as tensors.

Unpickling can run arbitrary code, so these files are refused unless `allow_pickle` is given, and
even then they go through `torch.load(weights_only=True)`, which builds tensors and plain
containers and refuses every other object. The tensors are copied once, one at a time, into a
temporary safetensors file that the rest of the tool reads like any other: zip-format checkpoints
are memory-mapped, so the copy never holds more than one tensor.
"""

from __future__ import annotations

import pickle
import shutil
import tempfile
import warnings
from pathlib import Path

from ..errors import InputError
from ..lazy_torch import torch
from .safetensors_file import DTYPE_NAMES
from .writer import SafetensorsWriter, TensorSpec

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Where training scripts nest the weights inside a checkpoint dict (SD .ckpt: "state_dict").
NESTED_STATE_DICTS = ("state_dict", "model", "module")


def pickle_refusal(path: Path) -> InputError:
    return InputError(
        f"{path}: pickle checkpoints can run code when loaded and are refused; convert it to .safetensors "
        "(for example with safetensors.torch.save_file), or pass --allow-pickle to load its tensors only "
        "(torch.load with weights_only=True)"
    )


def _load(path: Path) -> object:
    with warnings.catch_warnings():  # torch's notes on pickle protocols would break the one-line promise
        warnings.simplefilter("ignore")
        return _load_tensors_only(path)


def _load_tensors_only(path: Path) -> object:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: refused: the pickle holds more than tensors ({first})") from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise InputError(f"{path}: not a readable torch checkpoint ({type(exc).__name__})") from None


def state_dict_of(path: Path, loaded: object) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: the dict itself, or the one it nests under a usual key."""
    if isinstance(loaded, dict):
        for key in NESTED_STATE_DICTS:
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict):
        raise InputError(f"{path}: the checkpoint is a {type(loaded).__name__}, not a dict of tensors")
    tensors = {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise InputError(f"{path}: the checkpoint holds no named tensors")
    unsupported = sorted({str(t.dtype) for t in tensors.values() if t.dtype not in DTYPE_NAMES})
    if unsupported:
        raise InputError(f"{path}: tensors of dtype {', '.join(unsupported)} cannot be stored in safetensors")
    return tensors


def pickle_as_safetensors(path: Path) -> tuple[Path, Path]:
    """Copy a pickle checkpoint's tensors into a temporary safetensors file.

    Returns (the file, the temporary directory holding it); the caller removes the directory.
    """
    tensors = state_dict_of(path, _load(path))
    specs = [TensorSpec.of(name, t) for name, t in tensors.items()]
    directory = Path(tempfile.mkdtemp(prefix="loratool-pickle-"))
    out = directory / (path.stem + ".safetensors")
    try:
        with SafetensorsWriter(out, specs, None) as writer:
            for name, tensor in tensors.items():
                writer.write(name, tensor)
            writer.commit()
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return out, directory
