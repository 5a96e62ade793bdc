"""cloneofsimo's `lora_diffusion` files, the first SD LoRA format: `unet:N:up` / `unet:N:down`,
`text_encoder:N:up` / `...:down`, numbered in the order `lora_diffusion` met the modules it wrapped.

The numbers are the only names, so the order is the layout: lora_diffusion walked the model's
modules, and inside every module of a class named in the metadata (`unet`: `["CrossAttention",
"Attention", "GEGLU"]`, `text_encoder`: `["CLIPAttention"]`) took each nn.Linear in registration
order. In the diffusers of its day a transformer block registered `attn1`, `ff`, `attn2`, and a UNet
its `down_blocks`, `up_blocks`, then `mid_block`; CLIPAttention registers `k_proj`, `v_proj`, `q_proj`,
`out_proj`. `module_order` rebuilds that list from an architecture table; the count and every
module's shape must fit it, or the file is refused. lora_diffusion applies `up(down(x))` at scale 1 (no
alpha); ranks are repeated in the metadata (`unet:N:rank`). Files saved with `save_safeloras_with_embeds`
also hold textual-inversion tokens (`<s1>`: one embedding vector each), kept as the adapter's tokens.
"""

from __future__ import annotations

import json
import re

from ..adapter import TOKEN_WHAT, Adapter, AdapterModule
from ..archs import Architecture, architectures
from ..errors import FormatError
from ..io.source import TensorSource
from .base import Claim, Codec, build_modules

KEY = re.compile(r"^(unet|text_encoder):(\d+):(up|down)$")
TOKEN = re.compile(r"^<[^<>]+>$")
DEFAULT_CLASSES = {"unet": ["CrossAttention", "Attention", "GEGLU"], "text_encoder": ["CLIPAttention"]}
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
CLIP_ATTENTION = ("k_proj", "v_proj", "q_proj", "out_proj")
BLOCK_ORDER = ("down_blocks", "up_blocks", "mid_block")  # the UNet's registration order


def module_order(arch: Architecture, component: str, classes: list[str]) -> list[str]:
    """The canonical modules lora_diffusion numbered 0, 1, ... in `component` of `arch`."""
    attention = bool({"CrossAttention", "Attention"} & set(classes))
    out: list[str] = []
    if component == "unet":
        blocks = [
            n.rsplit(".attn1.to_q", 1)[0] for n in arch.modules if n.startswith("unet.") and n.endswith(".attn1.to_q")
        ]
        blocks.sort(key=lambda b: BLOCK_ORDER.index(b.split(".")[1]))  # stable: table order inside each
        for block in blocks:
            out += [f"{block}.attn1.{p}" for p in ATTENTION] if attention else []
            out += [f"{block}.ff.net.0.proj"] if "GEGLU" in classes else []
            out += [f"{block}.attn2.{p}" for p in ATTENTION] if attention else []
    else:
        layers = [n.rsplit(".self_attn.q_proj", 1)[0] for n in arch.modules if n.endswith(".self_attn.q_proj")]
        for layer in (layer for layer in layers if layer.startswith(f"{component}.")):
            out += [f"{layer}.self_attn.{p}" for p in CLIP_ATTENTION] if "CLIPAttention" in classes else []
            out += [f"{layer}.mlp.{p}" for p in ("fc1", "fc2")] if "CLIPMLP" in classes else []
    return [n for n in out if n in arch.modules]


class LoraDiffusionCodec(Codec):
    name = "lora-diffusion"
    alpha_convention = "none"

    def claim(self, source: TensorSource) -> Claim:
        claim = Claim(self)
        for key in source:
            match = KEY.match(key)
            if match is not None:
                claim.keys[key] = (f"{match[1]}:{match[2]}", match[3])
        if claim.keys:
            for key in source:
                if TOKEN.match(key) and len(source.info(key).shape) <= 2:
                    claim.extra[key] = TOKEN_WHAT
        return claim

    def read(self, source: TensorSource, claim: Claim, arch: str | None = None) -> Adapter:
        modules, orphans = build_modules(source, claim.keys, ("lora_diffusion",))
        candidates = [a for a in architectures().values() if arch is None or a.name == arch]
        fits = [(a, _placed(a, modules, source.metadata)) for a in candidates]
        fits = [(a, placed) for a, placed in fits if placed is not None]
        if not fits:
            raise FormatError(
                f"{source.path}: lora_diffusion modules numbered in an order no known architecture has "
                f"({len(modules)} modules); pass --arch if the model is one loratool knows"
            )
        exact = [(a, p) for a, p in fits if all(_full_size(a, modules[m], t) for m, t in p.items())]
        chosen, placed = (exact or fits)[0]
        for name, target in placed.items():
            module = modules[name]
            module.targets = (target,)
            module.component = target.split(".", 1)[0]
        tied = [a.name for a, _ in (exact or fits)] if len(exact or fits) > 1 else []
        reason = f"{len(placed)} modules in lora_diffusion's order" + (", full-size shapes match" if exact else "")
        return Adapter(
            source=source,
            format=self.name,
            native_layout="kohya",
            variant="with tokens " + ", ".join(claim.extra) if claim.extra else "no tokens",
            arch=chosen,
            arch_reason=reason + (f", ambiguous between {', '.join(tied)}" if tied else ""),
            arch_tied=tied,
            modules=modules,
            metadata=source.metadata,
            alpha_convention=self.alpha_convention,
            orphans=orphans,
            tokens={key: key for key in claim.extra},  # the key is the token itself
        )


def _classes(metadata: dict[str, str], component: str) -> list[str]:
    try:
        value = json.loads(metadata.get(component, ""))
    except json.JSONDecodeError:
        return DEFAULT_CLASSES[component]
    return value if isinstance(value, list) else DEFAULT_CLASSES[component]


def _placed(arch: Architecture, modules: dict[str, AdapterModule], metadata: dict[str, str]) -> dict[str, str] | None:
    """module name -> canonical target, when every numbered module fits `arch`'s order and shapes."""
    if not arch.lists_modules:
        return None
    placed = {}
    for component in ("unet", "text_encoder"):
        numbered = sorted((int(n.split(":")[1]), n) for n in modules if n.startswith(f"{component}:"))
        if not numbered:
            continue
        order = module_order(arch, component, _classes(metadata, component))
        if len(order) != len(numbered) or [i for i, _ in numbered] != list(range(len(order))):
            return None
        for (_, name), target in zip(numbered, order, strict=True):
            module, spec = modules[name], arch.modules[target]
            if module.shape_problem or module.weight_shape[0] > spec.shape[0] or module.weight_shape[1] > spec.shape[1]:
                return None
            placed[name] = target
    return placed


def _full_size(arch: Architecture, module: AdapterModule, target: str) -> bool:
    return tuple(module.weight_shape) == tuple(arch.modules[target].shape)
