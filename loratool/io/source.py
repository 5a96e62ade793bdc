"""Every on-disk container we read, seen as one namespace of lazily loaded tensors.

A LoRA file, a PEFT adapter directory, an HF sharded checkpoint and a diffusers pipeline folder
all become a `TensorSource`: ordered keys, header facts per key, and one tensor loaded on demand.
Nothing here reads tensor data until `load` is called, so opening a 70B checkpoint costs only its
headers.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from ..errors import InputError
from ..lazy_torch import torch
from .mlx_folder import MLX_WEIGHTS, is_mlx_config, reoriented_copy
from .pickle_file import PICKLE_SUFFIXES, pickle_as_safetensors, pickle_refusal
from .safetensors_file import SafetensorsFile, TensorInfo

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
DIFFUSERS_INDEX = "model_index.json"
HF_CONFIG = "config.json"


class TensorRef(NamedTuple):
    """A tensor's home: which file, and its name inside that file (a tuple: a source holds one per
    key, and a library scan opens thousands of sources)."""

    file: SafetensorsFile
    name: str

    @property
    def info(self) -> TensorInfo:
        return self.file.info(self.name)

    def load(self) -> torch.Tensor:
        return self.file.load(self.name)

    def scalar(self) -> float:
        return self.file.scalar(self.name)


class TensorSource:
    """Ordered keys over one or more safetensors files, with per-file metadata kept."""

    def __init__(
        self,
        path: Path,
        container: str,
        refs: dict[str, TensorRef],
        files: list[SafetensorsFile],
        config: dict | None = None,
    ) -> None:
        self.path = path
        self.container = container  # file | sharded | diffusers | peft | mlx
        self._refs = refs
        self.files = files
        self.config = config
        self.scratch: list[Path] = []  # temporary dirs of pickles copied to safetensors, removed on close

    @property
    def metadata(self) -> dict[str, str]:
        """Header metadata of the first file: where LoRA trainers put theirs (shards repeat `format`)."""
        return dict(self.files[0].metadata) if self.files else {}

    @property
    def nbytes(self) -> int:
        return sum(f.file_size for f in self.files)

    def keys(self) -> list[str]:
        return list(self._refs)

    def __iter__(self) -> Iterator[str]:
        return iter(self._refs)

    def __contains__(self, key: str) -> bool:
        return key in self._refs

    def __len__(self) -> int:
        return len(self._refs)

    def ref(self, key: str) -> TensorRef:
        return self._refs[key]

    def info(self, key: str) -> TensorInfo:
        return self._refs[key].info

    def load(self, key: str) -> torch.Tensor:
        return self._refs[key].load()

    def scalar(self, key: str) -> float:
        """A tensor's first value, from its bytes alone (alphas, flags)."""
        return self._refs[key].scalar()

    def close(self) -> None:
        for f in self.files:
            f.close()
        for directory in self.scratch:
            shutil.rmtree(directory, ignore_errors=True)

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_source(path: str | os.PathLike, allow_pickle: bool = False) -> TensorSource:
    """Open whatever the user pointed at; raise `InputError` with the reason when it is unusable.

    Pickle checkpoints are refused unless `allow_pickle`; then only their tensors are read.
    """
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except (OSError, ValueError):
        raise InputError(f"{p}: no such file or directory") from None
    opener = _Opener(allow_pickle)
    try:
        if stat.S_ISDIR(mode):
            source = _open_dir(p, opener)
        elif p.name.endswith(".index.json"):
            config = _read_json(p.parent / HF_CONFIG) if (p.parent / HF_CONFIG).is_file() else None
            source = _open_sharded(p, config, opener)
        else:
            source = opener.single(p, "file")
    except BaseException:
        opener.discard()
        raise
    source.scratch = opener.scratch
    return source


class _Opener:
    """Opens the files of one source, copying pickles to temporary safetensors when allowed."""

    def __init__(self, allow_pickle: bool) -> None:
        self.allow_pickle = allow_pickle
        self.scratch: list[Path] = []

    def discard(self) -> None:
        for directory in self.scratch:
            shutil.rmtree(directory, ignore_errors=True)

    def file(self, p: Path) -> SafetensorsFile:
        if p.suffix.lower() not in PICKLE_SUFFIXES:
            return SafetensorsFile(p)
        if not self.allow_pickle:
            raise pickle_refusal(p)
        copy, directory = pickle_as_safetensors(p)
        self.scratch.append(directory)
        return SafetensorsFile(copy)

    def single(self, p: Path, container: str, config: dict | None = None) -> TensorSource:
        f = self.file(p)
        return TensorSource(p, container, {k: TensorRef(f, k) for k in f}, [f], config)

    def mlx(self, d: Path, config: dict) -> TensorSource:
        """An mlx-lm adapter folder, its factors turned to the orientation every other layout has."""
        copy, directory = reoriented_copy(d / MLX_WEIGHTS)
        self.scratch.append(directory)
        f = SafetensorsFile(copy)
        return TensorSource(d, "mlx", {k: TensorRef(f, k) for k in f}, [f], config)

    def weights(self, d: Path) -> Path | None:
        found = weights_in(d)
        if found is None:
            found = weights_in(d, PICKLE_WEIGHT_NAMES)
            if found is not None and not self.allow_pickle:
                raise pickle_refusal(found)
        return found


def _read_json(p: Path) -> dict:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{p}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{p}: not valid JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise InputError(f"{p}: expected a JSON object")
    return data


def _open_dir(p: Path, opener: _Opener) -> TensorSource:
    if (p / PEFT_CONFIG).exists():
        config = _read_json(p / PEFT_CONFIG)
        if is_mlx_config(config):
            if not (p / MLX_WEIGHTS).is_file():
                raise InputError(f"{p}: mlx-lm adapter folder without {MLX_WEIGHTS}")
            return opener.mlx(p, config)
        weights = p / PEFT_WEIGHTS
        if not weights.is_file():
            weights = p / PEFT_PICKLE
            if not weights.is_file():
                raise InputError(f"{p}: PEFT adapter directory without {PEFT_WEIGHTS}")
        return opener.single(weights, "peft", config)
    if (p / DIFFUSERS_INDEX).exists():
        return _open_diffusers(p, opener)
    if (p / PEFT_WEIGHTS).is_file():
        raise InputError(
            f"{p}: PEFT adapter directory without {PEFT_CONFIG}; its rank and alpha are recorded there "
            "(save_pretrained writes both files)"
        )
    config = _read_json(p / HF_CONFIG) if (p / HF_CONFIG).is_file() else None
    weights = opener.weights(p)
    if weights is None:
        raise InputError(f"{p}: no .safetensors weights or index in this directory")
    if weights.name.endswith(".index.json"):
        return _open_sharded(weights, config, opener)
    return opener.single(weights, "file", config)


DEFAULT_WEIGHT_NAMES = (
    "model.safetensors",
    "diffusion_pytorch_model.safetensors",
    "pytorch_lora_weights.safetensors",
    PEFT_WEIGHTS,
)


# The pickle files save_pretrained wrote before safetensors; read only with --allow-pickle.
PEFT_PICKLE = "adapter_model.bin"
PICKLE_WEIGHT_NAMES = ("pytorch_model.bin", "diffusion_pytorch_model.bin", "pytorch_lora_weights.bin", PEFT_PICKLE)


def weights_in(d: Path, names: tuple[str, ...] = DEFAULT_WEIGHT_NAMES) -> Path | None:
    """The one weights file (or shard index) of a model directory; default names win over variants.

    `names` are the default file names (safetensors ones unless told); their suffix is the one searched.
    """
    suffix = Path(names[0]).suffix
    for candidates, defaults in (
        (sorted(d.glob(f"*{suffix}.index.json")), tuple(n + ".index.json" for n in names)),
        (sorted(d.glob(f"*{suffix}")), names),
    ):
        if len(candidates) == 1:
            return candidates[0]
        preferred = [c for c in candidates if c.name in defaults]
        if preferred:
            return preferred[0]
        if candidates:
            names = ", ".join(c.name for c in candidates)
            raise InputError(f"{d}: several weight files and none has a default name: {names}")
    return None


def _open_sharded(index_path: Path, config: dict | None, opener: _Opener) -> TensorSource:
    index = _read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise InputError(f"{index_path}: shard index without a valid weight_map")
    files: dict[str, SafetensorsFile] = {}
    try:
        for shard in dict.fromkeys(weight_map.values()):
            shard_path = index_path.parent / shard
            if Path(shard).name != shard:
                raise InputError(f"{index_path}: shard name {shard!r} points outside the index's directory")
            if not shard_path.is_file():
                raise InputError(f"{index_path}: names shard {shard}, which does not exist")
            files[shard] = opener.file(shard_path)
        refs: dict[str, TensorRef] = {}
        for shard, f in files.items():
            for key in f:
                if weight_map.get(key) == shard:
                    refs[key] = TensorRef(f, key)
        for key, shard in weight_map.items():
            if key not in refs:
                raise InputError(f"{index_path}: tensor {key!r} is mapped to {shard} but that shard does not hold it")
    except BaseException:
        for f in files.values():
            f.close()
        raise
    return TensorSource(index_path, "sharded", refs, list(files.values()), config)


def _open_diffusers(p: Path, opener: _Opener) -> TensorSource:
    """A pipeline folder; keys become `<component>.<key>`, the names diffusers-format LoRAs use."""
    model_index = _read_json(p / DIFFUSERS_INDEX)
    refs: dict[str, TensorRef] = {}
    files: list[SafetensorsFile] = []
    try:
        for component, spec in model_index.items():
            if component.startswith("_") or not isinstance(spec, list):
                continue
            sub = p / component
            weights = opener.weights(sub) if sub.is_dir() else None
            if weights is None:
                if spec and spec[0] is not None and _is_weighted_component(spec):
                    raise InputError(
                        f"{p}: component {component!r} listed in {DIFFUSERS_INDEX} has no safetensors weights"
                    )
                continue
            part = (
                _open_sharded(weights, None, opener)
                if weights.name.endswith(".index.json")
                else opener.single(weights, "file")
            )
            files.extend(part.files)
            for key in part:
                refs[f"{component}.{key}"] = part.ref(key)
    except BaseException:
        for f in files:
            f.close()
        raise
    if not files:
        raise InputError(f"{p}: diffusers folder without any safetensors weights")
    return TensorSource(p, "diffusers", refs, files, model_index)


def _is_weighted_component(spec: list) -> bool:
    """Schedulers, tokenizers and feature extractors carry no weights; models do."""
    cls = spec[1] if len(spec) > 1 else None
    if not isinstance(cls, str):
        return False
    return not any(word in cls for word in ("Scheduler", "Tokenizer", "FeatureExtractor", "ImageProcessor"))
