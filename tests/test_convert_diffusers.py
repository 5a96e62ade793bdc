"""convert --to diffusers / --to kohya checked against diffusers itself, offline, on the tiny models.

- Our diffusers files load the way users load them (`lora_state_dict(path, return_lora_metadata=True)`,
  `load_lora_adapter` / `load_lora_into_text_encoder` / `load_lora_into_transformer`, then fuse) and give
  exactly W + alpha/r * B @ A, computed here by hand from the kohya tensors, with zero unexpected keys, even
  for kohya SD1.5 files whose alphas differ per attention module (which diffusers' own kohya loader misapplies).
- Where diffusers' kohya loader is right (SDXL sgm names, Flux), our diffusers output applies the same update
  as diffusers' own conversion, module by module.
- Our kohya files pass through diffusers' kohya converters with nothing left over, and keep every update.
- kohya -> diffusers -> kohya gives back the same tensors, byte for byte (Flux: qkv split, then fused back).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from deltas import deltas
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loratool.commands.convert import convert

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

import diffusers.loaders.peft as diffusers_peft  # noqa: E402
from diffusers.loaders.lora_pipeline import (  # noqa: E402
    FluxLoraLoaderMixin,
    StableDiffusionLoraLoaderMixin,
    StableDiffusionXLLoraLoaderMixin,
)
from diffusers.utils.state_dict_utils import (  # noqa: E402
    StateDictType,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from tiny_models import clip_config, clip_text_model, flux_transformer, kohya_clip, sd15_unet, sdxl_unet  # noqa: E402
from torch import nn  # noqa: E402
from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SDXL_UNET_CONFIG = SimpleNamespace(layers_per_block=2)  # what diffusers needs to map sgm block numbers
REL = 1e-6


# -- helpers ------------------------------------------------------------------------------------------------
def read_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def flat_delta(up: torch.Tensor, down: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * B @ A in float64, flattened to 2-D (a conv's up is 1x1, its down keeps the kernel)."""
    return scale * (up.double().flatten(1) @ down.double().flatten(1))


def strip_text_model(name: str) -> str:
    """transformers 5 CLIP modules have no `text_model.` level; kohya names and our canonical names do."""
    return name.replace(".text_model.", ".")


def assert_close_rel(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rel: float = REL) -> None:
    assert set(got) == set(want), (sorted(set(got) - set(want)), sorted(set(want) - set(got)))
    for name in want:
        w = want[name].double()
        g = got[name].double().reshape(w.shape)
        err = (g - w).abs().max().item()
        assert err <= rel * w.abs().max().item(), f"{name}: max error {err:g} vs max |dW| {w.abs().max().item():g}"


@contextmanager
def diffusers_warnings() -> Iterator[list[str]]:
    """What diffusers logs at WARNING and above. Its library logger does not propagate to the root logger,
    so pytest's caplog never sees it: attach a handler to the `diffusers` logger itself."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("diffusers")
    handler, level = Collect(logging.WARNING), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


class LoadReports:
    """The key reports diffusers and transformers compute while loading an adapter: diffusers' models
    (`load_lora_adapter`) pass theirs to `_maybe_warn_for_unhandled_keys`; transformers' text models
    (`load_adapter`, which diffusers calls for text encoders) return theirs, and diffusers drops it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.unexpected: list[str] = []
        self.missing: list[str] = []
        self.reports = 0
        original = diffusers_peft._maybe_warn_for_unhandled_keys

        def record(incompatible_keys, adapter_name):
            self._add(incompatible_keys)
            return original(incompatible_keys, adapter_name)

        monkeypatch.setattr(diffusers_peft, "_maybe_warn_for_unhandled_keys", record)

    def _add(self, info) -> None:
        self.reports += 1
        self.unexpected += list(getattr(info, "unexpected_keys", None) or [])
        self.missing += [k for k in (getattr(info, "missing_keys", None) or []) if "lora_" in k]

    def watch(self, text_model: nn.Module) -> nn.Module:
        original = text_model.load_adapter

        def load_adapter(*args, **kwargs):
            info = original(*args, **kwargs)
            self._add(info)
            return info

        text_model.load_adapter = load_adapter
        return text_model


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def only_adapter(layer: LoraLayer) -> str:
    (name,) = layer.lora_A.keys()
    return name


def applied_deltas(models: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """What PEFT applies after diffusers loaded an adapter: scaling * B @ A of every injected layer, keyed
    `<component>.<module path>` (text encoders without `text_model.`: transformers 5's CLIPTextModel has
    no such level, its CLIPTextModelWithProjection still has)."""
    out = {}
    for component, model in models.items():
        for name, layer in lora_layers(model).items():
            adapter = only_adapter(layer)
            a, b = layer.lora_A[adapter].weight.detach(), layer.lora_B[adapter].weight.detach()
            out[strip_text_model(f"{component}.{name}")] = flat_delta(b, a, layer.scaling[adapter])
    return out


def assert_every_tensor_loaded(file_sd: dict[str, torch.Tensor], component: str, model: nn.Module) -> None:
    """Each `<component>.<path>.lora_A/B.weight` of the file sits, value for value, in an injected layer,
    and the model has no LoRA layer the file does not fill."""
    layers = lora_layers(model)
    seen = set()
    for key, value in file_sd.items():
        if not key.startswith(component + "."):
            continue
        path, role, _ = key[len(component) + 1 :].rsplit(".", 2)
        if not hasattr(model, "text_model"):  # transformers 5 CLIP: diffusers drops the level too
            path = path.removeprefix("text_model.")
        assert path in layers, f"{key}: no LoRA layer {path} in the model"
        layer = layers[path]
        got = getattr(layer, role)[only_adapter(layer)].weight.detach()
        assert torch.equal(got, value.to(got.dtype).reshape(got.shape)), key
        seen.add(path)
    assert seen == set(layers), sorted(set(layers) - seen)


def fuse(model: nn.Module) -> None:
    if hasattr(model, "fuse_lora"):  # diffusers models (PeftAdapterMixin)
        model.fuse_lora()
    else:  # transformers models: what diffusers' pipeline fuse_lora does per layer
        for m in model.modules():
            if isinstance(m, BaseTunerLayer):
                m.merge()


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}


def weight_now(model: nn.Module, name: str) -> torch.Tensor:
    module = model.get_submodule(name)
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    return module.weight.detach()


def kohya_modules(sd: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """kohya name -> (down, up, scale) with scale = alpha / rank (missing alpha = rank)."""
    out = {}
    for key in sd:
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            down, up = sd[key], sd[f"{name}.lora_up.weight"]
            alpha = sd.get(f"{name}.alpha")
            rank = down.shape[0]
            out[name] = (down, up, (float(alpha) if alpha is not None else rank) / rank)
    return out


# -- diffusers' kohya converters, and the modules they name -----------------------------------------------
def peft_name(component: str, key: str, tensor: torch.Tensor) -> str:
    """The PEFT module path diffusers' loaders give one converted key (legacy `.lora.down`, `to_q_lora`...)."""
    if key.endswith(".lora_A.weight"):
        converted = key
    elif component == "unet":
        (converted,) = convert_unet_state_dict_to_peft({key: tensor})
    else:  # text encoders: `self_attn.to_q_lora.down` and `mlp.fc1.lora_linear_layer.down` (old diffusers)
        (converted,) = convert_state_dict_to_peft({key: tensor}, original_type=StateDictType.DIFFUSERS_OLD)
    return converted[: -len(".lora_A.weight")]


def converted_deltas(state_dict: dict[str, torch.Tensor], alphas: dict[str, float] | None) -> dict[str, torch.Tensor]:
    """dW per module from what diffusers' kohya converter returns: factors under diffusers names and, for
    SD/SDXL, network alphas keyed `<module>.alpha` or `<down key>.alpha` (Flux: alphas baked into the
    factors, None). Each alpha is paired with its module here, so this reads the converter's output without
    the load step that misapplies alphas differing per attention module. Every alpha must find its module."""
    used = set()
    out = {}
    for key, down in state_dict.items():
        if not key.endswith((".down.weight", ".lora_A.weight")):
            continue
        up_key = key.replace(".down.weight", ".up.weight").replace(".lora_A.weight", ".lora_B.weight")
        up = state_dict[up_key]
        component, inner = key.split(".", 1)
        scale = 1.0
        if alphas:
            candidates = [f"{key}.alpha", key.replace(".lora.down.weight", ".alpha")]
            found = [c for c in candidates if c in alphas]
            assert len(found) == 1, (key, found)
            used.add(found[0])
            scale = alphas[found[0]] / down.shape[0]
        name = strip_text_model(f"{component}.{peft_name(component, inner, down)}")
        assert name not in out, name
        out[name] = flat_delta(up, down, scale)
    assert used == set(alphas or {}), sorted(set(alphas or {}) - used)
    return out


def canonical_deltas(path: Path) -> dict[str, torch.Tensor]:
    """tests/deltas.py (loratool's reader) with CLIP's `text_model.` level dropped, as diffusers names it."""
    return {strip_text_model(k): v.double() for k, v in deltas(path).items()}


def load_into(
    loader: type,
    models: dict[str, nn.Module],
    state_dict: dict[str, torch.Tensor],
    network_alphas: dict[str, float] | None,
    metadata: dict | None,
    monkeypatch: pytest.MonkeyPatch,
    alphas_matched: bool = True,
) -> dict[str, torch.Tensor]:
    """Load one LoRA state dict into every model the way a pipeline's load_lora_weights does, and return
    what PEFT applies per module. Fails on any unexpected or missing LoRA key and on any diffusers warning;
    with `alphas_matched`, also when PEFT warns that an alpha/rank pattern matched no module."""
    reports = LoadReports(monkeypatch)
    with diffusers_warnings() as warned, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for component, model in models.items():
            assert any(k.startswith(component + ".") for k in state_dict), component
            if component in ("unet", "transformer"):
                model.load_lora_adapter(state_dict, prefix=component, network_alphas=network_alphas, metadata=metadata)
            else:  # diffusers passes these to transformers' load_adapter
                reports.watch(model)
                loader.load_lora_into_text_encoder(
                    state_dict, network_alphas=network_alphas, text_encoder=model, prefix=component, metadata=metadata
                )
    assert reports.reports == len(models)
    assert reports.unexpected == [] and reports.missing == []
    assert warned == []
    if alphas_matched:  # peft: "The following alpha_pattern keys did not match any targeted module ..."
        assert [str(w.message) for w in caught if "did not match" in str(w.message)] == []
    return applied_deltas(models)


# -- 1. kohya SD1.5 with per-module alphas -> diffusers -> diffusers' own loaders ---------------------------
# Loaded straight from kohya by diffusers 0.42 (lora_state_dict + load_lora_adapter/load_lora_into_text_encoder
# with its network_alphas), 17 of these 31 modules get scale 1 instead of alpha / r: its alpha_pattern keys are
# `...attn1.processor.to_q_lora.down.weight` and `text_model.encoder.layers.0.self_attn`, which match no module
# (PEFT warns "alpha_pattern keys did not match any targeted module"), so those fall back to lora_alpha.
RANK, CONV_RANK = 4, 2
UNET_ALPHAS = {
    # per attention projection: to_q 2, to_k 8, to_v 1.5, to_out 4 (scales 0.5, 2, 0.375, 1)
    **{
        f"down_blocks.0.attentions.0.transformer_blocks.0.{attn}.{proj}": alpha
        for attn in ("attn1", "attn2")
        for proj, alpha in (("to_q", 2.0), ("to_k", 8.0), ("to_v", 1.5), ("to_out.0", 4.0))
    },
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj": 3.0,
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2": 4.0,
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_q": 0.5,  # same suffix as above, other alpha
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k": 8.0,
    "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_v": 1.5,
    "down_blocks.0.attentions.0.proj_in": 6.0,  # 1x1 conv (SD1)
    "mid_block.attentions.0.proj_out": 4.0,  # 1x1 conv
    "down_blocks.0.resnets.0.time_emb_proj": 2.0,
}
UNET_CONV3_ALPHAS = {  # 3x3 convs (LoCon) at rank 2
    "down_blocks.0.resnets.0.conv1": 1.0,
    "down_blocks.0.downsamplers.0.conv": 4.0,
    "up_blocks.1.resnets.2.conv2": 0.5,
}
TE_ALPHAS = {
    **{
        f"text_model.encoder.layers.{i}.{part}": alpha
        for i in (0, 1)
        for part, alpha in (
            ("self_attn.q_proj", 2.0),
            ("self_attn.k_proj", 8.0),
            ("self_attn.v_proj", 1.5),
            ("self_attn.out_proj", 4.0),
            ("mlp.fc1", 0.5),
            ("mlp.fc2", 4.0),
        )
    },
    "text_model.encoder.layers.1.self_attn.q_proj": 16.0,
}


def write_kohya_sd15(path: Path) -> dict[str, torch.Tensor]:
    """A kohya SD1.5 LoRA/LoCon with alphas differing per module, fp16 as kohya saves it."""
    g = torch.Generator().manual_seed(7)
    shapes = {
        "lora_unet_": {n: tuple(m.weight.shape) for n, m in sd15_unet().named_modules() if hasattr(m, "weight")},
        "lora_te_": {n: tuple(m.weight.shape) for n, m in kohya_clip().named_modules() if hasattr(m, "weight")},
    }
    sd: dict[str, torch.Tensor] = {}
    plan = [("lora_unet_", p, RANK, a) for p, a in UNET_ALPHAS.items()]
    plan += [("lora_unet_", p, CONV_RANK, a) for p, a in UNET_CONV3_ALPHAS.items()]
    plan += [("lora_te_", p, RANK, a) for p, a in TE_ALPHAS.items()]
    for prefix, module, rank, alpha in plan:
        out_f, in_f, *kernel = shapes[prefix][module]
        name = prefix + module.replace(".", "_")
        sd[f"{name}.lora_down.weight"] = (torch.randn(rank, in_f, *kernel, generator=g) * 0.05).half()
        sd[f"{name}.lora_up.weight"] = (torch.randn(out_f, rank, *[1] * len(kernel), generator=g) * 0.05).half()
        sd[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    save_file(sd, str(path), metadata={"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1"})
    return sd


def test_kohya_sd15_with_per_module_alphas_loads_into_diffusers_exactly(tmp_path, monkeypatch):
    src, dest = tmp_path / "kohya.safetensors", tmp_path / "diffusers.safetensors"
    kohya = write_kohya_sd15(src)
    convert(src, "diffusers", dest)

    state_dict, network_alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(
        str(dest), return_lora_metadata=True
    )
    assert network_alphas is None  # the alphas travel in lora_adapter_metadata, not as tensors
    assert metadata and metadata["unet.alpha_pattern"] and metadata["text_encoder.alpha_pattern"]
    file_sd = load_file(str(dest))
    assert state_dict.keys() == file_sd.keys()

    unet, te = sd15_unet(), clip_text_model()
    before = {"unet": base_weights(unet), "text_encoder": base_weights(te)}
    models = {"unet": unet, "text_encoder": te}
    load_into(StableDiffusionLoraLoaderMixin, models, state_dict, None, metadata, monkeypatch)
    assert_every_tensor_loaded(file_sd, "unet", unet)
    assert_every_tensor_loaded(file_sd, "text_encoder", te)

    # Every layer got its own alpha: PEFT's scaling is alpha / r of the kohya module.
    modules = kohya_modules(kohya)
    expect: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = {"unet": {}, "text_encoder": {}}
    for name, value in modules.items():
        if name.startswith("lora_unet_"):
            path = next(p for p in (*UNET_ALPHAS, *UNET_CONV3_ALPHAS) if "lora_unet_" + p.replace(".", "_") == name)
            expect["unet"][path] = value
        else:
            path = next(p for p in TE_ALPHAS if "lora_te_" + p.replace(".", "_") == name)
            expect["text_encoder"][path.removeprefix("text_model.")] = value
    assert sum(len(v) for v in expect.values()) == len(modules)
    for component, model in (("unet", unet), ("text_encoder", te)):
        layers = lora_layers(model)
        assert set(layers) == set(expect[component])
        for path, (_, _, scale) in expect[component].items():
            assert layers[path].scaling[only_adapter(layers[path])] == pytest.approx(scale, rel=1e-12), path

    fuse(unet)
    fuse(te)
    for component, model in (("unet", unet), ("text_encoder", te)):
        for name, w0 in before[component].items():
            now = weight_now(model, name)
            if name not in expect[component]:
                assert torch.equal(now, w0), f"{component}.{name} changed without a LoRA"
                continue
            down, up, scale = expect[component][name]
            want = w0.double() + flat_delta(up, down, scale).reshape(w0.shape)
            assert not torch.equal(now, w0), f"{component}.{name}: LoRA not applied"
            torch.testing.assert_close(now.double(), want, rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


# -- 2. kohya SDXL (sgm names) and Flux -> diffusers, against diffusers' own kohya conversion ---------------
def with_alphas(sd: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """The same file with every alpha tensor set to one value (in its own dtype)."""
    return {k: torch.tensor(alpha, dtype=v.dtype) if k.endswith(".alpha") else v for k, v in sd.items()}


def sdxl_models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "unet": sdxl_unet(),
        "text_encoder": CLIPTextModel(clip_config()),
        "text_encoder_2": CLIPTextModelWithProjection(clip_config()),
    }


def flux_models() -> dict[str, nn.Module]:
    return {"transformer": flux_transformer(), "text_encoder": clip_text_model()}


@pytest.mark.parametrize("alpha", [None, 2.0], ids=["fixture-alphas", "all-alpha-2"])
def test_sdxl_kohya_to_diffusers_matches_diffusers_conversion(tmp_path, monkeypatch, alpha):
    src = FIXTURES / "kohya_sdxl.safetensors"
    sd = load_file(str(src))
    # The fixture: alpha 2 on linears, 1 on 3x3 convs (rank 4). diffusers names conv alphas `<module>.alpha`,
    # which its alpha_pattern matches; only the attention processors' alphas (`...to_q_lora.down.weight.alpha`)
    # match nothing, and the fixture's attention alphas are all the most common value, so diffusers is right.
    if alpha is not None:
        src = tmp_path / "equal.safetensors"
        sd = with_alphas(sd, alpha)
        save_file(sd, str(src), metadata=read_metadata(FIXTURES / "kohya_sdxl.safetensors"))
    dest = tmp_path / "diffusers.safetensors"
    convert(src, "diffusers", dest)

    theirs_sd, theirs_alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(dict(sd), unet_config=SDXL_UNET_CONFIG)
    theirs = load_into(StableDiffusionXLLoraLoaderMixin, sdxl_models(), theirs_sd, theirs_alphas, None, monkeypatch)
    ours_sd, ours_alphas, metadata = StableDiffusionXLLoraLoaderMixin.lora_state_dict(
        str(dest), return_lora_metadata=True
    )
    assert ours_alphas is None
    ours = load_into(StableDiffusionXLLoraLoaderMixin, sdxl_models(), ours_sd, None, metadata, monkeypatch)

    assert len(ours) == len(kohya_modules(sd)) == 53
    assert_close_rel(ours, theirs)
    # and both are the kohya file's own update (alpha / rank * up @ down)
    assert_close_rel(ours, canonical_deltas(src))


LINEAR1_PARTS = {
    f"transformer.single_transformer_blocks.{i}.{p}"
    for i in (0, 1)
    for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
}


def diffusers_kohya_flux(
    sd: dict[str, torch.Tensor], linear1: str = "_linear1."
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """diffusers' kohya Flux conversion, and the modules it could not convert.

    diffusers 0.42 splits single-block `linear1` with the full model's widths hard-coded
    (dims=[3072, 3072, 3072, 12288]) and fails an assert on the narrow model: convert without linear1
    (keys containing `linear1`: kohya's `_linear1.`, or `.linear1.` under `diffusion_model.`) then,
    and leave its parts out of the comparison."""
    try:
        converted, alphas = FluxLoraLoaderMixin.lora_state_dict(dict(sd), return_alphas=True)
        skipped: set[str] = set()
    except AssertionError:
        rest = {k: v for k, v in sd.items() if linear1 not in k}
        converted, alphas = FluxLoraLoaderMixin.lora_state_dict(rest, return_alphas=True)
        skipped = LINEAR1_PARTS
    assert alphas is None  # kohya Flux: diffusers bakes alpha / rank into the factors
    return converted, skipped


@pytest.mark.parametrize("alpha", [None, 2.0], ids=["fixture-alphas", "all-alpha-2"])
def test_flux_kohya_to_diffusers_matches_diffusers_conversion(tmp_path, monkeypatch, alpha):
    src = FIXTURES / "kohya_flux.safetensors"
    sd = load_file(str(src))
    assert {float(v) for k, v in sd.items() if k.endswith(".alpha")} == {4.0}  # rank 4: scale 1
    if alpha is not None:  # scale 0.5, which diffusers bakes into the factors
        src = tmp_path / "alpha2.safetensors"
        sd = with_alphas(sd, alpha)
        save_file(sd, str(src), metadata=read_metadata(FIXTURES / "kohya_flux.safetensors"))
    dest = tmp_path / "diffusers.safetensors"
    report = convert(src, "diffusers", dest)
    assert report.modules_in == 26 + 12
    assert report.modules_out == 26 - 4 - 2 + 4 * 3 + 2 * 4 + 12  # qkv -> 3 parts, linear1 -> 4

    theirs_sd, skipped = diffusers_kohya_flux(sd)
    theirs = load_into(FluxLoraLoaderMixin, flux_models(), theirs_sd, None, None, monkeypatch)
    ours_sd, ours_alphas, metadata = FluxLoraLoaderMixin.lora_state_dict(
        str(dest), return_alphas=True, return_lora_metadata=True
    )
    assert not ours_alphas
    ours = load_into(FluxLoraLoaderMixin, flux_models(), ours_sd, None, metadata, monkeypatch)

    assert len(ours) == report.modules_out
    assert set(ours) - set(theirs) == skipped
    assert_close_rel({k: v for k, v in ours.items() if k not in skipped}, theirs)
    # linear1 too: each of our parts is the kohya module's own update for its row block
    assert_close_rel(ours, canonical_deltas(src))


# -- 3. our kohya output through diffusers' kohya converters ----------------------------------------------
def kohya_roundtrip(src: Path, tmp_path: Path) -> Path:
    """src -> diffusers -> kohya."""
    mid, back = tmp_path / "mid.safetensors", tmp_path / "back.safetensors"
    convert(src, "diffusers", mid)
    convert(mid, "kohya", back)
    return back


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
def test_our_kohya_output_passes_through_diffusers_kohya_loader(tmp_path, monkeypatch, family):
    if family == "sd15":  # diffusers' own file: rank and alpha patterns become per-module kohya alphas
        src = FIXTURES / "diffusers_sd15.safetensors"
        dest = tmp_path / "kohya.safetensors"
        convert(src, "kohya", dest)
    elif family == "sdxl":  # sgm names written back from diffusers names
        src = FIXTURES / "kohya_sdxl.safetensors"
        dest = kohya_roundtrip(src, tmp_path)
    else:  # diffusers' own Flux file: to_q/k/v fused into qkv and (with proj_mlp) linear1
        src = FIXTURES / "flux_diffusers.safetensors"
        dest = tmp_path / "kohya.safetensors"
        convert(src, "kohya", dest)
    sd = load_file(str(dest))
    assert all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in sd)

    # Leftovers: the SD/SDXL converter raises ValueError("The following keys have not been correctly
    # renamed"); the Flux one raises ValueError("Incompatible keys detected") for non-text keys and logs
    # "Unsupported keys for ai-toolkit" for text-encoder ones.
    skipped: set[str] = set()
    with diffusers_warnings() as warned:
        if family == "sd15":
            converted, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(dict(sd))
            loader, models = StableDiffusionLoraLoaderMixin, {"unet": sd15_unet(), "text_encoder": clip_text_model()}
        elif family == "sdxl":
            converted, alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(dict(sd), unet_config=SDXL_UNET_CONFIG)
            loader, models = StableDiffusionXLLoraLoaderMixin, sdxl_models()
        else:
            converted, skipped = diffusers_kohya_flux(sd)
            alphas = None
            loader, models = FluxLoraLoaderMixin, {"transformer": flux_transformer()}
    assert warned == []
    everything = canonical_deltas(src)
    assert_close_rel(canonical_deltas(dest), everything)  # loratool's reader, linear1 included
    source = {k: v for k, v in everything.items() if k not in skipped}
    # every source module, and nothing else, under the name diffusers gives it, with the same update
    assert_close_rel(converted_deltas(converted, alphas), source)

    # ...and it loads into the models with no unexpected or missing key. diffusers' load step ignores kohya
    # alphas that differ per attention module (its alpha_pattern keys are `...to_q_lora.down.weight`, which
    # match no module), so the applied update is compared only where the alphas leave it right.
    diffusers_right = family != "sd15"
    applied = load_into(loader, models, converted, alphas, None, monkeypatch, alphas_matched=diffusers_right)
    assert set(applied) == set(source)
    if diffusers_right:
        assert_close_rel(applied, source)


# -- 4. round trips -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["kohya_sd15.safetensors", "kohya_sdxl.safetensors", "kohya_flux.safetensors"])
def test_kohya_to_diffusers_to_kohya_is_byte_identical(tmp_path, fixture):
    src = FIXTURES / fixture
    back = kohya_roundtrip(src, tmp_path)
    a, b = load_file(str(src)), load_file(str(back))
    assert a.keys() == b.keys()
    for key, value in a.items():
        if key.endswith(".alpha"):  # re-created from the metadata: same value, maybe another dtype
            assert float(b[key]) == float(value), key
            continue
        assert b[key].dtype == value.dtype and b[key].shape == value.shape, key
        assert b[key].contiguous().view(torch.uint8).equal(value.contiguous().view(torch.uint8)), key
    da, db = deltas(src), deltas(back)
    assert da.keys() == db.keys()
    for key in da:
        assert torch.equal(da[key], db[key]), key
    # the training record travels along
    meta_a, meta_b = read_metadata(src), read_metadata(back)
    for key in ("ss_base_model_version", "ss_output_name", "ss_learning_rate", "ss_seed", "ss_network_module"):
        assert meta_b.get(key) == meta_a[key], key
