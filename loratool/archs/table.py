"""Architecture tables: every module of a model family and its name in every layout.

Modules are the Linear, Conv and Embedding layers LoRA adapts and the normalization layers with a
learned weight (type "norm") that LyCORIS can train; all resolve by name the same way.

A table is data generated from the reference implementations (see `generate.py` and `families/`). Here it becomes
lookups: any name a LoRA file may use for a module (kohya, diffusers/PEFT path, single-file path
with the prefixes ComfyUI and BFL use) maps to a tuple of canonical module names. A tuple longer
than one means the name covers a fused weight (Flux `qkv`/`linear1`, OpenCLIP `in_proj`) whose row
blocks are those modules, in order.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import ClassVar

from .base import BaseArchitecture

TABLES = Path(__file__).with_name("tables")

Targets = tuple[str, ...]
# Module types and the weight dimensions each may have. A conv's weight is (out, in, *kernel) for
# Conv1d, Conv2d or Conv3d (the patch embeddings of video models: out, in, kt, kh, kw); a norm's
# is its per-channel weight.
MODULE_NDIMS = {"linear": (2,), "conv": (3, 4, 5), "embedding": (2,), "norm": (1,)}
MODULE_TYPES = tuple(MODULE_NDIMS)


@dataclass(frozen=True)
class KohyaNaming:
    prefix: str
    paths: str  # "native" (single-file module path) or "name" (diffusers/HF path)


@dataclass(frozen=True)
class Component:
    name: str  # diffusers component name: unet, text_encoder, text_encoder_2, transformer
    short: str  # what users call it: unet, te, te1, te2, t5, transformer
    kohya: tuple[KohyaNaming, ...]
    file_prefixes: tuple[str, ...]  # prefixes of this component's keys in single-file checkpoints
    lora_prefixes: tuple[str, ...]  # prefixes LoRA files use with single-file module paths
    optional_levels: tuple[str, ...] = ()  # path levels some library versions omit (CLIP's text_model.)
    comfyui: KohyaNaming | None = None  # what ComfyUI reads: prefix + single-file ("native") or HF ("name") paths


@dataclass(frozen=True)
class ModuleSpec:
    name: str  # canonical: "<component>.<diffusers or HF path>"
    component: str
    type: str  # linear | conv | embedding | norm (LayerNorm/GroupNorm/RMSNorm with a learned weight)
    shape: tuple[int, ...]  # full-size weight shape (MODULE_NDIMS; [C] for a norm), informational: narrow
    # test models differ
    target: str  # default | conv | extra | norm: which modules trainers adapt by default (norm: LyCORIS's
    # norm algorithm only, which adds `w_norm`/`b_norm` to the norm's weight and bias)
    native: str | None = None  # module path in the single-file layout (None: lives in a fused weight)
    weight: str | None = None  # parameter key when it is not native + ".weight" (BFL norms: ".scale")
    transposed: bool = False  # single-file parameter stored as (in, out)
    rows: str | None = None  # "swap_halves": single-file rows are the diffusers halves swapped
    fused: str | None = None  # fused group this module is a row block of
    part: int | None = None

    @property
    def path(self) -> str:
        return self.name[len(self.component) + 1 :]

    @property
    def native_weight(self) -> str | None:
        if self.native is None:
            return None
        return self.weight or self.native + ".weight"


@dataclass(frozen=True)
class FusedSpec:
    name: str
    component: str
    native: str
    weight: str
    # per part: "in" (rows = the weight's input width), "in*a/b" (that fraction of it: the k and v of
    # grouped-query attention) or "rest" (the rows that remain)
    sizes: tuple[str, ...]
    parts: Targets

    def row_sizes(self, in_features: int, out_features: int, parts: Targets | None = None) -> list[int]:
        """Rows of each part (of `parts`, a subset in order, when given) for a concrete weight with
        `out_features` rows over those parts: widths come from the tensors, never from constants."""
        kinds = self.sizes if parts is None else [self.sizes[self.parts.index(p)] for p in parts]
        fixed = [None if s == "rest" else _fraction_of(s, in_features) for s in kinds]
        rest = out_features - sum(f for f in fixed if f is not None)
        return [rest if f is None else f for f in fixed]


def _fraction_of(size: str, in_features: int) -> int:
    """The rows of an "in" or "in*a/b" part for a weight of `in_features` inputs."""
    if size == "in":
        return in_features
    m = re.fullmatch(r"in\*(\d+)/(\d+)", size)
    if m is None:
        raise ValueError(f"unknown fused part size {size!r}")
    return in_features * int(m.group(1)) // int(m.group(2))


def kohya_flat(path: str) -> str:
    """kohya's module naming: every '.' of the path becomes '_'."""
    return path.replace(".", "_")


@dataclass
class Architecture(BaseArchitecture):
    """A model family whose generated table lists every module with its full-size shape and its
    name in every layout."""

    lists_modules: ClassVar[bool] = True
    name: str
    title: str
    hints: dict[str, list[str]]
    components: dict[str, Component]
    modules: dict[str, ModuleSpec]
    fused: dict[str, FusedSpec]
    sources: dict[str, str] = field(default_factory=dict)
    order: int = 0  # where the family sorts among the others (its module's declared ORDER)
    kohya_network_module: str = "networks.lora"
    widened_inputs: tuple[str, ...] = ()
    # input layer -> {input width: the model whose LoRAs take it} (Flux.1 img_in: 128 control, 384 Fill)
    widened_models: dict[str, dict[int, str]] = field(default_factory=dict)
    yields_to: tuple[str, ...] = ()  # families that win a tie nothing in the file breaks (see detect)
    family: str = ""  # the family module whose variant this is (wan2.1-i2v-14b: wan)

    @classmethod
    def load(cls, path: Path) -> Architecture:
        data = json.loads(path.read_text(encoding="utf-8"))
        components = {
            c["name"]: Component(
                name=c["name"],
                short=c["short"],
                kohya=tuple(KohyaNaming(k["prefix"], k["paths"]) for k in c["kohya"]),
                file_prefixes=tuple(c["file_prefixes"]),
                lora_prefixes=tuple(c["lora_prefixes"]),
                optional_levels=tuple(c.get("optional_levels", ())),
                comfyui=KohyaNaming(c["comfyui"]["prefix"], c["comfyui"]["paths"]) if "comfyui" in c else None,
            )
            for c in data["components"]
        }
        modules = {}
        for m in data["modules"]:
            if m["type"] not in MODULE_TYPES:
                raise ValueError(f"{path}: {m['name']} has unknown module type {m['type']!r}")
            if len(m["shape"]) not in MODULE_NDIMS[m["type"]]:
                raise ValueError(f"{path}: {m['name']} is a {m['type']} with a {len(m['shape'])}-D shape {m['shape']}")
            component = m["name"].split(".", 1)[0]
            modules[m["name"]] = ModuleSpec(
                name=m["name"],
                component=component,
                type=m["type"],
                shape=tuple(m["shape"]),
                target=m["target"],
                native=m.get("native"),
                weight=m.get("weight"),
                transposed=m.get("transposed", False),
                rows=m.get("rows"),
                fused=m.get("fused"),
                part=m.get("part"),
            )
        fused = {
            f["name"]: FusedSpec(
                f["name"], f["name"].split(".", 1)[0], f["native"], f["weight"], tuple(f["sizes"]), tuple(f["parts"])
            )
            for f in data["fused"]
        }
        if not isinstance(data.get("order"), int):
            raise ValueError(f"{path}: no integer 'order' (regenerate with `python -m loratool.archs.generate`)")
        sources = data.get("sources", {})
        network = data.get("kohya_network_module", "networks.lora")
        return cls(
            data["arch"],
            data["title"],
            data["hints"],
            components,
            modules,
            fused,
            sources,
            data["order"],
            network,
            tuple(data.get("widens", {})),
            {k: {int(w): m for w, m in v.items()} for k, v in data.get("widens", {}).items()},
            tuple(data.get("yields_to", ())),
            data.get("family", data["arch"]),
        )

    # -- names in the layouts LoRA files use ---------------------------------------------------------
    @cached_property
    def kohya_index(self) -> dict[str, Targets]:
        """kohya/LyCORIS module name -> canonical modules."""
        index: dict[str, Targets] = {}
        for spec in self.modules.values():
            comp = self.components[spec.component]
            for naming in comp.kohya:
                path = spec.path if naming.paths == "name" else spec.native
                if path is not None:
                    _add(index, naming.prefix + kohya_flat(path), (spec.name,))
        for group in self.fused.values():
            for naming in self.components[group.component].kohya:
                if naming.paths == "native":
                    _add(index, naming.prefix + kohya_flat(group.native), group.parts)
        return index

    @cached_property
    def kohya_native_names(self) -> frozenset[str]:
        """kohya names built from single-file paths (their factor rows follow that file's order)."""
        names = set()
        for spec in self.modules.values():
            for naming in self.components[spec.component].kohya:
                if naming.paths == "native" and spec.native is not None:
                    names.add(naming.prefix + kohya_flat(spec.native))
        return frozenset(names)

    @cached_property
    def path_index(self) -> dict[str, Targets]:
        """diffusers/PEFT dotted names (`component.path`, with optional levels dropped) -> modules."""
        index: dict[str, Targets] = {}
        for spec in self.modules.values():
            comp = self.components[spec.component]
            for variant in level_variants(spec.path, comp.optional_levels):
                _add(index, f"{comp.name}.{variant}", (spec.name,))
        return index

    @cached_property
    def native_index(self) -> dict[str, Targets]:
        """Single-file module paths under the prefixes ComfyUI and BFL files use -> modules."""
        index: dict[str, Targets] = {}
        for spec in self.modules.values():
            if spec.native is not None:
                for prefix in self.components[spec.component].lora_prefixes:
                    _add(index, prefix + spec.native, (spec.name,))
        for group in self.fused.values():
            for prefix in self.components[group.component].lora_prefixes:
                _add(index, prefix + group.native, group.parts)
        for spec in self.modules.values():  # ComfyUI's text encoder names: its prefix + the HF path
            naming = self.components[spec.component].comfyui
            if naming is not None and naming.paths == "name":
                _add(index, naming.prefix + spec.path, (spec.name,))
        return index

    def comfyui_name(self, targets: Targets) -> str | None:
        """The module name ComfyUI reads for one module or a whole fused weight (None: a row block
        of a fused weight, or a component ComfyUI has no naming for)."""
        spec = self.modules[targets[0]]
        naming = self.components[spec.component].comfyui
        if naming is None:
            return None
        if len(targets) > 1:
            group = self.fused_group(targets)
            return naming.prefix + group.native if group is not None and naming.paths == "native" else None
        path = spec.native if naming.paths == "native" else spec.path
        return None if path is None else naming.prefix + path

    def index(self, scheme: str) -> dict[str, Targets]:
        return {"kohya": self.kohya_index, "diffusers": self.path_index, "native": self.native_index}[scheme]

    def kohya_name(self, target: str) -> str:
        """The name kohya, A1111 and ComfyUI expect (first naming of the component)."""
        spec = self.modules[target]
        naming = self.components[spec.component].kohya[0]
        path = spec.path if naming.paths == "name" else spec.native
        if path is None:
            raise KeyError(f"{target} has no kohya name of its own: it is a slice of {spec.fused}")
        return naming.prefix + kohya_flat(path)

    # -- the questions every architecture answers (base.BaseArchitecture) ---------------------------------
    def spec(self, target: str) -> ModuleSpec | None:
        return self.modules.get(target)

    def component_label(self, component: str | None) -> str | None:
        return self.components[component].short if component is not None else None

    def optional_levels(self, component: str | None) -> tuple[str, ...]:
        return self.components[component].optional_levels if component in self.components else ()

    def fused_group_of(self, target: str) -> FusedSpec | None:
        spec = self.modules.get(target)
        return self.fused.get(spec.fused or "") if spec is not None else None

    def fused_group(self, targets: Targets) -> FusedSpec | None:
        """The fused weight whose row blocks are exactly `targets` in order, if there is one."""
        if len(targets) < 2:
            return None
        group = self.fused.get(self.modules[targets[0]].fused or "")
        return group if group is not None and group.parts == targets else None


def level_variants(path: str, levels: tuple[str, ...]) -> list[str]:
    out = [path]
    for level in levels:
        if path.startswith(level):
            out.append(path[len(level) :])
    return out


def _add(index: dict[str, Targets], key: str, targets: Targets) -> None:
    previous = index.setdefault(key, targets)
    if previous != targets:
        raise ValueError(f"architecture table maps {key!r} to both {previous} and {targets}")
