"""mlx-lm adapter folders (`adapters.safetensors` + mlx's `adapter_config.json`).

Keys are the model's own module paths with `lora_a`/`lora_b` (and `m`, DoRA's magnitude per output
row); the source has already turned the factors to (r, in) and (out, r) (io/mlx_folder.py). mlx-lm
applies `scale * (x @ lora_a) @ lora_b` with `lora_parameters.scale` from the config, one scale for
every module and no alpha, so alpha is recorded as scale x rank, the value that gives that scale under
alpha / r.

`MlxLayout` writes the folder mlx-lm's `load_adapters` reads: factors turned back to (in, r) and
(r, out), and a config with one rank and one scale (mlx has no per-module values, so modules that
differ are refused by name), `keys` naming the module types per layer and `num_layers` -1 (every
layer: a layer the adapter leaves alone gets mlx's zero-initialised `lora_b`, no update).
"""

from __future__ import annotations

import re

from ..adapter import Adapter, AdapterModule, Piece
from ..archs import BaseArchitecture, Targets
from ..errors import ConversionError, FormatError
from ..io.mlx_folder import MLX_WEIGHTS
from ..io.source import TensorSource
from ..kinds import dora, suffix_table
from .base import MODIFIERS, Claim, Codec, build_modules, place_on_architecture, split_dotted, suffixes_longest_first
from .layout import Entry, Layout, Origin, reshaped

TURNED = {"lora_a": "down", "lora_b": "up"}  # mlx's tensors, each the transpose of a canonical factor
LAYER = re.compile(r"(^|\.)layers\.\d+\.")  # mlx-lm's `keys` are paths inside one layer


class MlxCodec(Codec):
    name = "mlx"
    alpha_convention = "scale"

    def claim(self, source: TensorSource) -> Claim:
        claim = Claim(self)
        if source.container != "mlx":
            return claim
        suffixes = suffixes_longest_first(suffix_table("mlx"), MODIFIERS["mlx"])
        for key in source:
            split = split_dotted(key, suffixes)
            if split is not None:
                claim.keys[key] = split
        return claim

    def read(self, source: TensorSource, claim: Claim, arch: str | None = None) -> Adapter:
        config = source.config or {}
        kind = config.get("fine_tune_type", "dora" if config.get("use_dora") else "lora")
        if kind not in ("lora", "dora"):
            raise FormatError(f"{source.path}: mlx-lm fine_tune_type {kind!r} saves weights, not an adapter")
        parameters = config.get("lora_parameters") or {}
        try:
            scale = float(parameters.get("scale", 20.0))  # mlx-lm's default when the config omits it
        except (TypeError, ValueError):
            raise FormatError(f"{source.path}: lora_parameters.scale is {parameters.get('scale')!r}") from None
        modules, orphans = build_modules(source, claim.keys, ("mlx",))
        for module in modules.values():
            if module.rank is not None:
                module.alpha = scale * module.rank
                module.alpha_source = "config"
        model = str(config.get("model") or "")
        found = place_on_architecture(
            modules, "diffusers", source.metadata, hf_name_hint=model.rstrip("/").rsplit("/", 1)[-1] or None, only=arch
        )
        return Adapter(
            source=source,
            format="mlx",
            native_layout="mlx",
            variant=f"mlx-lm {kind}, scale {scale:g}",
            arch=found.arch,
            arch_reason=found.reason,
            arch_tied=found.tied,
            modules=modules,
            metadata=source.metadata,
            config=None,
            alpha_convention=self.alpha_convention,
            orphans=orphans,
        )


def turned(piece: Piece) -> Piece:
    """The factor as mlx stores it: (in, r) for down, (r, out) for up."""
    return Piece(piece.dtype, piece.shape[::-1], piece.key, piece.compute, transposed=True)


class MlxLayout(Layout):
    name = "mlx"
    scheme = "mlx"
    single_component = True
    is_directory = True
    weights_name = MLX_WEIGHTS

    def unit_name(self, arch: BaseArchitecture, targets: Targets) -> str | None:
        if arch.lists_modules or len(targets) != 1:
            return None  # mlx-lm adapts language models, whose module paths are the names
        return arch.module_path(targets[0])

    def why_not(self, unit: AdapterModule) -> str | None:
        if unit.kind.name != "lora" or "mid" in unit.pieces or len(unit.pieces["down"].shape) != 2:
            return f"mlx-lm holds linear LoRA/DoRA only, not {unit.kind.label}" + (
                " convs" if unit.kind.name == "lora" else ""
            )
        if unit.embedding or unit.transposed:
            return "mlx-lm's LoRA wraps nn.Linear only (no embeddings, no transposed Conv1D weights)"
        if "bias" in unit.pieces:
            return "mlx-lm's LoRA has no bias (lora_B.bias)"
        if dora.ROLE in unit.pieces and unit.dora_columns:
            return "its DoRA magnitude is per input column; mlx-lm's is per output row"
        return None

    def check_together(self, units: dict[str, AdapterModule], arch: BaseArchitecture | None) -> None:
        first_name, first = next(iter(units.items()))
        for name, unit in units.items():
            if (unit.rank, unit.scale) != (first.rank, first.scale):
                raise ConversionError(
                    f"{unit.name}: rank {unit.rank}, scale {unit.scale:g}, while {first.name} has rank {first.rank}, "
                    f"scale {first.scale:g}; an mlx-lm adapter has one rank and one scale"
                )
            if (dora.ROLE in unit.pieces) != (dora.ROLE in first.pieces):
                raise ConversionError(f"{name}: mlx-lm adapters are DoRA throughout or not at all ({first_name})")

    def entries(self, name: str, unit: AdapterModule, arch: BaseArchitecture | None) -> list[Entry]:
        out = [Entry(f"{name}.{suffix}", turned(unit.pieces[role])) for suffix, role in TURNED.items()]
        magnitude = unit.pieces.get(dora.ROLE)
        if magnitude is not None:
            out.append(Entry(f"{name}.{dora.NAMES['mlx']}", reshaped(magnitude, (unit.pieces["up"].shape[0],))))
        return out

    def config(self, units: dict[str, AdapterModule], adapter: Origin, arch: BaseArchitecture | None) -> dict:
        first = next(iter(units.values()))
        kept = adapter.config if adapter.format == "mlx" else None  # the training record mlx wrote
        config = {k: v for k, v in (kept or {}).items() if k not in ("fine_tune_type", "use_dora", "lora_parameters")}
        parameters = dict((kept or {}).get("lora_parameters") or {})
        parameters.update(rank=first.rank, scale=first.scale, keys=sorted({LAYER.split(n)[-1] for n in units}))
        parameters.setdefault("dropout", 0.0)
        parameters.pop("alpha", None)  # mlx-lm reads the scale; an alpha beside it would only mislead
        config.update(
            fine_tune_type="dora" if dora.ROLE in first.pieces else "lora", num_layers=-1, lora_parameters=parameters
        )
        return config
