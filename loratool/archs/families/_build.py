"""How a reference model becomes table rows, shared by every family module.

A family module states facts (configs, naming tables, prefixes); the rules for what becomes a row
(every Linear, Conv and Embedding, every normalization layer with a learned weight), how single-file
names attach to it and how fused weights are grouped live here once, so every family's table has
the same shape. torch, diffusers and transformers are imported inside the functions: importing a
family module to discover it costs nothing and needs neither library.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

Row = dict[str, object]
# What one component contributes: its entry under "components", its module rows, its fused groups.
ComponentRows = tuple[dict, list[Row], dict[str, Row]]
# diffusers/HF path -> what the single-file layout calls it: {"native": ...} (plus "weight",
# "transposed", "rows"), or {"fused": ..., "part": i} for a row block of a fused weight, or {} when
# the module has no single-file counterpart (it is then left out).
NativeRule = Callable[[str], dict]

# Row block sizes of each kind of fused weight, by its last name: "in" = the weight's input width,
# "rest" = the rows that remain (Flux's linear1 ends with the MLP's rows). A family whose parts differ
# (grouped-query attention: k and v narrower than q) gives "sizes" in its fused rule ("in*1/3").
FUSED_SIZES = {"in_proj": ["in", "in", "in"], "qkv": ["in", "in", "in"], "linear1": ["in", "in", "in", "rest"]}


# How trainers name a DiT's modules in kohya-style files: sd-scripts and musubi-tuner `lora_unet_` +
# the single-file path (the name written), OneTrainer `lora_transformer_` + the diffusers path,
# SimpleTuner's LyCORIS `lycoris_` + the diffusers path.
DIT_KOHYA = [
    {"prefix": "lora_unet_", "paths": "native"},
    {"prefix": "lora_transformer_", "paths": "name"},
    {"prefix": "lycoris_", "paths": "name"},
]

# ComfyUI's generic rule: a LoRA module named `diffusion_model.` + a base key's module path loads.
DENOISER_COMFYUI = {"prefix": "diffusion_model.", "paths": "native"}


def comfyui_text_encoder(name: str) -> dict:
    """ComfyUI reads a text encoder's LoRA under `text_encoders.` + its own state-dict prefix
    (`clip_l.transformer.`, `t5xxl.transformer.`) + the HF path."""
    return {"prefix": f"text_encoders.{name}.transformer.", "paths": "name"}


@dataclass(frozen=True)
class TableFamily:
    """One model family, as its module declares it: the generator writes `tables/<name>.json` from
    it, and `order` places the family among the others (detection breaks ties by table order, so the
    order is part of the behaviour; gaps of 10 leave room for families that belong in between)."""

    name: str  # the table's name; must equal the module's name
    title: str  # what users call the family
    order: int
    hints: dict[str, list[str]]  # metadata key -> value prefixes that name the family
    components: Callable[[], list[ComponentRows]]  # builds the reference models: call only to generate
    kohya_network_module: str = "networks.lora"  # sd-scripts' network module for the family's LoRAs
    # Input layers whose LoRAs may take more input channels than the model (Flux control and fill
    # LoRAs concatenate a control image: img_in 64 -> 128), with the models each width names; merge
    # widens the base with zero columns.
    widens: dict[str, dict[int, str]] = field(default_factory=dict)
    # Families whose LoRAs this one's are read as when nothing in a file tells them apart (names,
    # shapes, metadata): HunyuanVideo's blocks are Flux.1's, module for module and shape for shape.
    yields_to: tuple[str, ...] = ()
    family: str = ""  # the family module's name, which its variants share (set by the generator)


def is_norm(mod: object) -> bool:
    """A normalization layer with a learned per-channel weight: LayerNorm (elementwise_affine),
    GroupNorm (affine), RMSNorm (torch's or diffusers') and T5's LayerNorm. Norms without a weight
    (Flux's modulated LayerNorms) have nothing to train and are left out."""
    import torch.nn as nn

    norm_class = isinstance(mod, (nn.LayerNorm, nn.GroupNorm)) or type(mod).__name__.endswith(
        ("RMSNorm", "LayerNorm", "GroupNorm")
    )
    weight = getattr(mod, "weight", None)
    return norm_class and isinstance(weight, nn.Parameter) and weight.dim() == 1


def table_modules(model: object) -> Iterator[tuple[str, str, list[int]]]:
    """(path, type, full-size weight shape) of every module a table lists, in the model's order.

    Convs of any dimension are type "conv" with their weight's shape: (out, in, k) for Conv1d,
    (out, in, kh, kw) for Conv2d, (out, in, kt, kh, kw) for the Conv3d patch embeddings of video
    models."""
    import torch.nn as nn

    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            yield name, "linear", [mod.out_features, mod.in_features]
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            yield name, "conv", list(mod.weight.shape)
        elif isinstance(mod, nn.Embedding):
            yield name, "embedding", [mod.num_embeddings, mod.embedding_dim]
        elif is_norm(mod):
            yield name, "norm", list(mod.weight.shape)


def on_meta(build: Callable[[], object]) -> object:
    """Build a full-size model without allocating its weights (no memory, no downloads)."""
    import torch

    with torch.device("meta"):
        return build()


def same_name(path: str) -> dict:
    """The rule for a component whose single-file names are its HF paths (CLIP-L, T5)."""
    return {"native": path}


def text_encoder_target(path: str) -> str:
    """HF text encoders (CLIP, T5): trainers adapt the attention and MLP projections by default."""
    return "default" if re.search(r"\.(self_attn|mlp|SelfAttention|DenseReluDense)\.", path) else "extra"


def component(
    name: str,
    short: str,
    model: object,
    kohya: list[dict],
    file_prefixes: list[str],
    lora_prefixes: list[str],
    native: NativeRule,
    target: Callable[[str], str],
    add_level: str = "",
    optional_levels: tuple[str, ...] = (),
    comfyui: dict | None = None,
) -> ComponentRows:
    """The rows of one component (diffusers name `name`, users' name `short`) of a family.

    `kohya` lists kohya namings ({"prefix", "paths": "native" | "name"}), first the one kohya
    writes; `file_prefixes` are where single-file checkpoints keep the component's keys and
    `lora_prefixes` what LoRA files put before its single-file paths. `native` names each module in
    the single-file layout and `target` says whether trainers adapt it by default. `add_level` is
    prefixed to paths a library version leaves it off; `optional_levels` are levels files may omit.
    `comfyui` is the naming ComfyUI reads for the component ({"prefix", "paths": "native" | "name"}):
    a denoiser's single-file names under `diffusion_model.` (the default), a text encoder's HF
    paths under `text_encoders.<its name in ComfyUI>.transformer.`.
    """
    rows: list[Row] = []
    fused: dict[str, Row] = {}
    for path, kind, shape in table_modules(model):
        if add_level and not path.startswith(add_level) and path != "text_projection":
            path = add_level + path
        # Norms are never a default target: LyCORIS's norm algorithm trains them, plain LoRA does not.
        row: Row = {
            "name": f"{name}.{path}",
            "type": kind,
            "shape": shape,
            "target": "norm" if kind == "norm" else target(path),
        }
        extra = native(path)
        if not extra:
            continue
        row.update({k: v for k, v in extra.items() if k != "sizes"})  # sizes belong to the fused group
        if "fused" in extra:
            group_name = f"{name}.{extra['fused']}"
            row["fused"] = group_name
            group = fused.setdefault(
                group_name,
                {
                    "name": group_name,
                    "native": extra["fused"],
                    "weight": extra["fused"] + ("_weight" if extra["fused"].endswith("in_proj") else ".weight"),
                    "sizes": extra.get("sizes") or FUSED_SIZES[extra["fused"].rsplit(".", 1)[1]],
                    "parts": [],
                },
            )
            while len(group["parts"]) <= extra["part"]:
                group["parts"].append(None)
            group["parts"][extra["part"]] = row["name"]
        rows.append(row)
    for group in fused.values():
        assert None not in group["parts"] and len(group["parts"]) == len(group["sizes"]), group
    info = {
        "name": name,
        "short": short,
        "kohya": kohya,
        "file_prefixes": file_prefixes,
        "lora_prefixes": lora_prefixes,
    }
    info["comfyui"] = comfyui or DENOISER_COMFYUI
    if optional_levels:
        info["optional_levels"] = list(optional_levels)
    return info, rows, fused
