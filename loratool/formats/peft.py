"""PEFT adapter directories: `adapter_model.safetensors` + `adapter_config.json`.

Keys are `base_model.model.<module path>.<tensor>`; rank and alpha come from the config (`r`,
`lora_alpha`/`alpha`, `rank_pattern`, `alpha_pattern`, `use_rslora`), never from the header.

`PeftCodec` reads the layout; `PeftLayout` writes it: one adapter type per directory (LoRA, LoHa
or LoKr), the config under which PEFT rebuilds every stored shape, and for a diffusion model the
pipeline component it adapts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from ..adapter import Adapter, AdapterModule, Orphan, Piece
from ..archs import ArchDetection, BaseArchitecture, Targets, detect, hint_matches
from ..archs.catalog import get_catalog
from ..errors import ConversionError, FormatError
from ..io.source import PEFT_CONFIG, TensorSource
from ..kinds import KINDS, peft_ia3
from ..kinds.vera import SHARED
from ..lazy_torch import torch
from .base import (
    MODIFIERS,
    Claim,
    Codec,
    build_modules,
    implied_shapes,
    piece_of,
    place_on_architecture,
    split_dotted,
    suffixes_longest_first,
)
from .diffusers import component_configs
from .layout import COMPONENT_KEY, WRAPPER, Origin, carried_metadata
from .peft_config import checked_config, pattern_value
from .peft_keyed import PeftKeyed, config_alpha, lora_config, rank_alpha_fields, short_path
from .peft_lycoris import LOKR_FIELDS, LYCORIS_FIELDS, lycoris_structure

LYCORIS_KINDS = ("loha", "lokr")  # PEFT's LoHa and LoKr: LyCORIS's tensors, PEFT's config rules
ROTATIONS = ("oft-peft", "boft-peft")  # kinds whose math lives in the config they were trained with
PEFT_TYPES = {
    "LORA": "lora",
    "LOHA": "loha",
    "LOKR": "lokr",
    "IA3": "ia3-peft",
    "ADALORA": "adalora",
    "VERA": "vera",
    "OFT": "oft-peft",
    "BOFT": "boft-peft",
}
ALPHA_FIELD = {"lora": "lora_alpha", "loha": "alpha", "lokr": "alpha"}
ADALORA_INIT_R = 12  # AdaLoraConfig's default init_r
VERA_SHARED = "base_model."  # where PEFT saves VeRA's shared projections: base_model.vera_A
EMBEDDING_SUFFIXES = ("lora_embedding_A", "lora_embedding_B")
# The pipeline component a PEFT dir of a diffusion model adapts. PEFT records none, and a text
# encoder's module paths fit a bare transformers model (and SDXL's two encoders) equally well.


class PeftCodec(Codec):
    """PEFT adapter dirs, and single files with PEFT's keys (config in `lora_adapter_metadata`)."""

    name = "peft"
    alpha_convention = "config"

    def _config(self, source: TensorSource) -> dict | None:
        if source.container == "peft":
            return checked_config(source.config or {}, source.path.parent / PEFT_CONFIG)
        configs = component_configs(source.metadata)
        return (configs or {}).get("")

    def _kind_name(self, source: TensorSource, config: dict | None) -> str:
        peft_type = (config or {}).get("peft_type", "LORA")
        if peft_type not in PEFT_TYPES:
            supported = ", ".join(PEFT_TYPES)
            raise FormatError(f"{source.path}: PEFT adapter type {peft_type!r} is not supported ({supported} are)")
        return PEFT_TYPES[peft_type]

    def claim(self, source: TensorSource) -> Claim:
        claim = Claim(self)
        if source.container not in ("peft", "file"):
            return claim
        config = self._config(source)
        kind = KINDS[self._kind_name(source, config)]
        suffixes = suffixes_longest_first(kind.names["peft"], MODIFIERS["peft"])
        saved = tuple((config or {}).get("modules_to_save") or ())
        for key in source:
            if kind.name == "vera" and key.startswith(VERA_SHARED) and key[len(VERA_SHARED) :] in SHARED:
                claim.keys[key] = ("", key[len(VERA_SHARED) :])  # one tensor every module reads
                continue
            if not key.startswith(WRAPPER):
                continue
            rest = key[len(WRAPPER) :]
            split = split_dotted(rest, suffixes)
            if split is not None:
                claim.keys[key] = split
            elif rest.endswith(".base_layer.weight"):
                claim.extra[key] = "base layer saved with the adapter (PEFT save_embedding_layers)"
            elif _is_saved_module(rest.rsplit(".", 1)[0], saved):
                claim.extra[key] = "modules_to_save: a full trained copy of the module"
        return claim

    def read(self, source: TensorSource, claim: Claim, arch: str | None = None) -> Adapter:
        config = self._config(source)
        kind_name = self._kind_name(source, config)
        shared = {suffix: key for key, (module, suffix) in claim.keys.items() if module == ""}
        keys = {key: claimed for key, claimed in claim.keys.items() if claimed[0] != ""}
        modules, orphans = build_modules(source, keys, ("peft",))
        if kind_name == "vera":
            _attach_projections(modules, shared, config or {}, source)
        if kind_name == "adalora":
            orphans += _pruned_away(modules)
        embeddings = {module for key, (module, suffix) in claim.keys.items() if suffix in EMBEDDING_SUFFIXES}
        if kind_name == "oft-peft" and config is not None and "oft_block_size" not in config:
            raise FormatError(
                f"{source.path}: an OFT adapter from PEFT before 0.14 (no oft_block_size in its config); "
                "PEFT itself no longer loads these"
            )
        for name, module in modules.items():
            module.embedding = name in embeddings
            module.kind = module.kind.configured(config or {})
            if config is None:
                continue  # a bare state dict: alpha = rank, as every reader assumes
            module.transposed = module.embedding or bool(config.get("fan_in_fan_out", False))
            if kind_name == "adalora":
                _adalora_scale(module, config, source)
                continue
            if kind_name not in ALPHA_FIELD:
                continue  # IA3: a vector with no rank or alpha
            module.alpha = float(
                pattern_value(config.get("alpha_pattern"), name, config.get(ALPHA_FIELD[kind_name], 8))
            )
            module.alpha_source = "config"
            module.declared_rank = int(pattern_value(config.get("rank_pattern"), name, config.get("r", 8)))
            module.rslora = bool(config.get("use_rslora", False))
        found = _place(modules, source, config or {}, arch)
        return Adapter(
            source=source,
            format="peft",
            native_layout="peft",
            variant=str((config or {}).get("peft_type", "LORA"))
            + ("" if source.container == "peft" else ", single file" + ("" if config else " without a config")),
            arch=found.arch,
            arch_reason=found.reason,
            arch_tied=found.tied,
            modules=modules,
            metadata=source.metadata,
            config=config,
            alpha_convention=self.alpha_convention if config else "none",
            orphans=orphans,
            extra_keys=dict(claim.extra),
        )


def _attach_projections(
    modules: dict[str, AdapterModule], shared: dict[str, str], config: dict, source: TensorSource
) -> None:
    """Give every VeRA module the shared projections. PEFT saves them only with `save_projection`;
    otherwise it regenerates them from `projection_prng_key` with torch's generator, which is not a
    file's content and not something loratool reproduces."""
    if set(shared) != set(SHARED):
        key = config.get("projection_prng_key", 0)
        raise FormatError(
            f"{source.path}: this VeRA adapter was saved without its shared projections vera_A/vera_B "
            f"(save_projection is {str(config.get('save_projection', False)).lower()}); PEFT regenerates "
            f"them from projection_prng_key={key} at load time. Save it again with save_projection=True"
        )
    for module in modules.values():
        module.pieces = {**module.pieces, **{role: piece_of(source, shared[suffix]) for suffix, role in SHARED.items()}}


def _pruned_away(modules: dict[str, AdapterModule]) -> list[Orphan]:
    """AdaLoRA modules whose rank allocation kept no rank: PEFT saves them with zero-size factors,
    and they change nothing. They leave the adapter as notes, not as modules of rank 0."""
    gone = [name for name, m in modules.items() if m.kind.name == "adalora" and m.shapes["down"][0] == 0]
    orphans = []
    for name in gone:
        module = modules.pop(name)
        why = "AdaLoRA pruned every rank of this module (zero-size factors): no update"
        orphans += [Orphan(p.key, name, why, "info") for p in module.pieces.values() if p.key is not None]
    return orphans


def _adalora_scale(module: AdapterModule, config: dict, source: TensorSource) -> None:
    """AdaLoRA scales by lora_alpha / (ranknum + 1e-5): ranknum is the rank the layer was made with
    (`init_r`; a `ranknum` tensor where an older PEFT saved one), whatever rank pruning left. A
    lora_alpha of 0 means the rank that is left, as PEFT's `scaling` has it."""
    alpha = config.get("lora_alpha", 8)
    module.alpha = float(alpha) if alpha > 0 else None
    module.alpha_source = "config"
    ranknum = module.pieces.get("ranknum")
    if ranknum is not None and ranknum.key is not None:
        module.declared_rank = round(source.scalar(ranknum.key))
    else:
        module.declared_rank = int(config.get("init_r", ADALORA_INIT_R))


def _place(modules: dict, source: TensorSource, config: dict, arch: str | None) -> ArchDetection:
    """An LLM adapter names modules by their model path; an adapter on one diffusers component
    (a UNet, a Flux transformer) names them by the path inside that component."""
    metadata = source.metadata
    components = get_catalog().components
    named = metadata.get(COMPONENT_KEY)
    if named in components:
        return place_on_architecture(modules, "diffusers", metadata, names=lambda m: f"{named}.{m}", only=arch)
    hinted = any(hint_matches(a, metadata) for a in get_catalog().tables)
    if arch is None and not hinted:  # a diffusion model's name in the metadata rules out a bare LLM
        found = place_on_architecture(
            modules, "diffusers", metadata, hf_name_hint=config.get("base_model_name_or_path") or None
        )
        if found.arch is not None:
            return found
    implied = implied_shapes(modules)
    best: tuple[int, int, str | None] = (0, 0, None)
    for component in sorted(components):  # ties keep the first (text_encoder before text_encoder_2)
        found = detect([f"{component}.{n}" for n in modules], "diffusers", metadata, only=arch)
        if found.arch is None or not found.arch.lists_modules:
            continue  # no table knows the names (detect fell back to a transformers family)
        fits = sum(
            1
            for name, targets in found.resolved.items()
            if implied[name[len(component) + 1 :]] == found.arch.spec(targets[0]).shape
        )
        if (len(found.resolved), fits) > best[:2]:
            best = (len(found.resolved), fits, component)
    component = best[2]
    if component is None:
        found = place_on_architecture(modules, "diffusers", metadata, only=arch)
        if found.arch is None or not found.resolved:
            # PEFT keys over a model's original single-file names (ai-toolkit's Krea 2 files:
            # `base_model.model.blocks.0.attn.wq`): the tables' native index knows them.
            native = place_on_architecture(modules, "native", metadata, only=arch)
            if native.arch is not None and native.resolved:
                for module in modules.values():
                    module.native_rows = True
                return native
        return found
    return place_on_architecture(modules, "diffusers", metadata, names=lambda m: f"{component}.{m}", only=arch)


def _ia3_config(pairs: list[tuple[str, AdapterModule]], levels: tuple[str, ...], base: dict | None) -> dict:
    """An IA3Config: every module a target, those scaled per input column feed-forward modules."""
    config = {k: v for k, v in (base or {}).items() if k not in ("target_modules", "feedforward_modules")}
    config["target_modules"] = sorted({short_path(p, levels) for p, _ in pairs})
    config["feedforward_modules"] = sorted(
        {short_path(p, levels) for p, u in pairs if u.pieces["vector"].shape[0] == 1}
    )
    config.setdefault("fan_in_fan_out", False)
    return config


def saved_parameter(key: str) -> str:
    """The base-model parameter a full weight saved with the adapter stands for (modules_to_save,
    or an embedding's `base_layer` saved by save_embedding_layers)."""
    return key.removeprefix(WRAPPER).replace(".base_layer.", ".")


def _is_saved_module(path: str, saved: tuple[str, ...]) -> bool:
    """PEFT's own rule: a module is saved when its name ends with an entry (a plain string suffix,
    so "norm" also saves every "input_layernorm")."""
    return any(path.endswith(m) for m in saved)


class PeftLayout(PeftKeyed):
    name = "peft"
    single_component = True
    is_directory = True
    kinds = ("lora", "loha", "lokr", "ia3-peft", "oft-peft", "boft-peft")

    def check_together(self, units: dict[str, AdapterModule], arch: BaseArchitecture | None) -> None:
        kinds = {u.kind.name: u for u in units.values()}
        if len(kinds) > 1:
            first, second = list(kinds.values())[:2]
            raise ConversionError(
                f"{second.name}: {second.kind.label}, while {first.name} is {first.kind.label}; a PEFT "
                "adapter holds one adapter type (use --to kohya for a mixed file)"
            )
        if units and next(iter(units.values())).kind.name in LYCORIS_KINDS:
            self._lycoris_fields(units, arch)

    def why_not(self, unit: AdapterModule) -> str | None:
        if unit.kind.name == "ia3":  # what `adopt` left as LyCORIS's
            return "LyCORIS's IA3 of a conv or a transposed weight has no PEFT IA3 form here (use --to kohya)"
        return super().why_not(unit)

    def adopt(self, unit: AdapterModule, load: Callable[[Piece], torch.Tensor]) -> AdapterModule:
        """LyCORIS's IA3 of a linear layer as PEFT's: ia3_l = 1 + w, (out, 1) or (1, in)."""
        if unit.kind.name != "ia3" or unit.transposed:
            return unit
        axis = "in" if "in" in unit.pieces else "out"
        vector = unit.pieces[axis]
        if len(vector.shape) != 1:
            return unit  # a conv's (1, C, 1, 1): PEFT's IA3 of a conv is another layout (why_not names it)
        shape = (vector.shape[0], 1) if axis == "out" else (1, vector.shape[0])
        factor = Piece.made(vector, shape, lambda: peft_ia3.from_lycoris(axis, load(vector)))
        note = f"{unit.name}: LyCORIS's IA3 written as PEFT's (ia3_l = 1 + weight)"
        return replace(unit, kind=KINDS["ia3-peft"], pieces={"vector": factor}, notes=[*unit.notes, note])

    def _lycoris_fields(self, units: dict[str, AdapterModule], arch: BaseArchitecture | None) -> dict:
        levels = self._levels(units, arch)
        pairs = [(name[len(WRAPPER) :], u) for name, u in units.items()]
        specs = {path: arch.spec(u.targets[0]) for path, u in pairs} if arch is not None else {}
        kernels = {path: tuple(spec.shape[2:]) for path, spec in specs.items() if spec is not None}
        fields, ranks = lycoris_structure(pairs[0][1].kind.name, pairs, kernels)
        # The source's own alpha where PEFT keeps its rank; alpha = scale * r where the rank is chosen
        # here (two whole LoKr factors have none).
        alphas = {
            p: config_alpha(u.alpha_for(False) if ranks[p] == u.rank else u.scale * ranks[p], u) for p, u in pairs
        }
        fields.update(rank_alpha_fields(ranks, alphas, levels, "alpha"))
        fields["target_modules"] = sorted({short_path(p, levels) for p, _ in pairs})
        return fields

    @staticmethod
    def _levels(units: dict[str, AdapterModule], arch: BaseArchitecture | None) -> tuple[str, ...]:
        return arch.optional_levels(next(iter(units.values())).component) if arch is not None else ()

    def carries_full_weights(self, arch: BaseArchitecture | None) -> bool:
        return True

    def unit_name(self, arch: BaseArchitecture, targets: Targets) -> str | None:
        return WRAPPER + arch.module_path(targets[0]) if len(targets) == 1 else None

    def metadata(
        self, units: dict[str, AdapterModule], adapter: Origin, arch: BaseArchitecture | None
    ) -> dict[str, str]:
        metadata = {**carried_metadata(adapter.metadata, units), "format": "pt"}  # what PEFT writes
        if arch is not None and arch.components:  # which of the model's components the adapter wraps
            metadata[COMPONENT_KEY] = next(iter(units.values())).component
        return metadata

    def config(self, units: dict[str, AdapterModule], adapter: Origin, arch: BaseArchitecture | None) -> dict:
        levels = self._levels(units, arch)
        pairs = [(name[len(WRAPPER) :], u) for name, u in units.items()]
        # A PEFT source's own config (or the one an LLM kohya file carries); a diffusers file's
        # per-component configs are not a PEFT dir's.
        single_model = arch is not None and not arch.components
        base = adapter.config if adapter.format == "peft" or single_model else None
        kind = pairs[0][1].kind.name
        peft_type = next(t for t, k in PEFT_TYPES.items() if k == kind)
        if (base or {}).get("peft_type", "LORA") != peft_type:
            base = None  # another adapter type's fields would not be this config's
        if kind == "lora":
            config = lora_config(pairs, levels, base)
            config.setdefault("bias", "none")
            config.setdefault("fan_in_fan_out", any(u.transposed and not u.embedding for u in units.values()))
        elif kind == "ia3-peft":
            config = _ia3_config(pairs, levels, base)
        elif kind in ROTATIONS:
            if base is None:
                raise ConversionError(
                    f"{pairs[0][1].name}: {pairs[0][1].kind.label} needs the PEFT config it was trained with "
                    "(block sizes, COFT and Cayley settings), and the source has none"
                )
            config = dict(base)
        else:
            config = {k: v for k, v in (base or {}).items() if k not in (*LYCORIS_FIELDS, *LOKR_FIELDS)}
            fields = self._lycoris_fields(units, arch)
            if config.get("target_modules"):
                fields.pop("target_modules")
            config.update(fields)
        config["peft_type"] = peft_type
        config.setdefault("task_type", None)
        config.setdefault("base_model_name_or_path", None)
        config.setdefault("inference_mode", True)
        return config
