"""`convert --to comfyui`: the layout ComfyUI's maintainers ask trainers to ship.

- Names follow ComfyUI's rule: every denoiser module is `diffusion_model.` + the module path of a
  weight in the family's single-file checkpoint (checked against a real one, built from the tiny
  models), every text encoder module `text_encoders.<clip_l|clip_g|t5xxl>.transformer.` + the path
  of a weight in the transformers model.
- Nothing is lost: read back, the file is the same modules (kind, rank, alpha), and converted back to
  kohya it is the kohya source tensor for tensor.
- diffusers' own Flux loader reads our Flux file to the same update as our diffusers output.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_convert_diffusers import assert_close_rel, canonical_deltas, diffusers_kohya_flux, flux_models, load_into
from test_merge_diffusers import base_checkpoint
from tiny_models import clip_config, clip_text_model, flux_transformer, sd15_unet, sdxl_unet

import loratool
from loratool.archs import get_architecture

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
DENOISER = "diffusion_model."
CASES = {  # fixture -> family
    "kohya_sd15": "sd1",
    "kohya_sdxl": "sdxl",
    "kohya_flux": "flux1",
    "flux_diffusers": "flux1",
    "flux_comfyui": "flux1",
    "lycoris_loha": "sd1",
    "lycoris_lokr": "sd1",
}


def tiny_models(family: str) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    if family == "sd1":
        return {"unet": sd15_unet(), "text_encoder": clip_text_model()}
    if family == "sdxl":
        from transformers import CLIPTextModelWithProjection

        return {
            "unet": sdxl_unet(),
            "text_encoder": clip_text_model(),
            "text_encoder_2": CLIPTextModelWithProjection(clip_config(projection_dim=32)),
        }
    return {"transformer": flux_transformer(), "text_encoder": clip_text_model()}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("comfyui")
    out = {}
    for name in CASES:
        out[name] = root / f"{name}.safetensors"
        loratool.convert(FIXTURES / f"{name}.safetensors", "comfyui", out[name])
    return out


def module_names(path: Path) -> set[str]:
    return {m.name for m in loratool.inspect(path).modules}


@pytest.mark.parametrize("name", list(CASES))
def test_names_are_what_comfyui_loads(converted, name: str) -> None:
    family = CASES[name]
    arch = get_architecture(family)
    models = tiny_models(family)
    checkpoint = base_checkpoint(arch, models)
    weights = {k.removesuffix(".weight") for k in checkpoint if k.endswith(".weight")}
    prefixes = {arch.components[c].file_prefixes[0] for c in ("unet", "transformer") if c in arch.components}
    text_states = {c: set(m.state_dict()) for c, m in models.items() if c.startswith("text_encoder")}
    names = module_names(converted[name])
    assert names and all(n.startswith((DENOISER, "text_encoders.")) for n in names), sorted(names)[:5]
    for module in names:
        if module.startswith(DENOISER):
            path = module[len(DENOISER) :]
            assert any(p + path in weights for p in prefixes), module
        else:
            encoder, path = module.removeprefix("text_encoders.").split(".transformer.", 1)
            states = set().union(*text_states.values())
            assert path + ".weight" in states or path.removeprefix("text_model.") + ".weight" in states, module
            assert encoder in ("clip_l", "clip_g"), module


@pytest.mark.parametrize("name", list(CASES))
def test_read_back_it_is_the_same_adapter(converted, name: str) -> None:
    source, ours = loratool.inspect(FIXTURES / f"{name}.safetensors"), loratool.inspect(converted[name])
    assert ours.format == "comfyui" and ours.architecture == source.architecture
    assert not [f for f in ours.findings if f.severity != "info"]

    def by_targets(report) -> dict:
        return {tuple(m.targets): (m.kind, m.rank, m.alpha, m.scale) for m in report.modules}

    if name != "flux_diffusers":  # diffusers' q/k/v are fused into ComfyUI's qkv (alpha over the summed rank)
        assert by_targets(ours) == by_targets(source)
    assert_close_rel(canonical_deltas(converted[name]), canonical_deltas(FIXTURES / f"{name}.safetensors"))


@pytest.mark.parametrize("name", ["kohya_sd15", "kohya_sdxl", "kohya_flux", "lycoris_loha", "lycoris_lokr"])
def test_back_to_kohya_is_the_source_tensor_for_tensor(converted, tmp_path, name: str) -> None:
    back = tmp_path / "back.safetensors"
    loratool.convert(converted[name], "kohya", back)
    want, got = load_file(str(FIXTURES / f"{name}.safetensors")), load_file(str(back))
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_diffusers_reads_our_flux_file_as_our_diffusers_file(converted, tmp_path, monkeypatch) -> None:
    """FluxLoraLoaderMixin takes `diffusion_model.` + BFL names with kohya tensors (its kohya path)."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    ours_path = tmp_path / "diffusers.safetensors"
    loratool.convert(FIXTURES / "kohya_flux.safetensors", "diffusers", ours_path)
    ours_sd, _, metadata = FluxLoraLoaderMixin.lora_state_dict(
        str(ours_path), return_alphas=True, return_lora_metadata=True
    )
    ours = load_into(FluxLoraLoaderMixin, flux_models(), ours_sd, None, metadata, monkeypatch)
    theirs_sd, skipped = diffusers_kohya_flux(load_file(str(converted["kohya_flux"])), linear1=".linear1.")
    theirs = load_into(FluxLoraLoaderMixin, flux_models(), theirs_sd, None, None, monkeypatch)
    assert set(ours) - set(theirs) == skipped
    assert_close_rel(theirs, {k: v for k, v in ours.items() if k not in skipped})


def test_resize_and_combine_keep_the_comfyui_layout(converted, tmp_path) -> None:
    """resize keeps its source's layout; combine writes the first LoRA's (or --to comfyui)."""
    source = converted["kohya_flux"]
    loratool.resize(source, tmp_path / "resized.safetensors", rank=2)
    resized = loratool.inspect(tmp_path / "resized.safetensors")
    assert resized.format == "comfyui" and {m.rank for m in resized.modules} == {2}
    assert module_names(tmp_path / "resized.safetensors") == module_names(source)
    loratool.combine([FIXTURES / "kohya_sd15.safetensors"] * 2, tmp_path / "combined.safetensors", to="comfyui")
    assert module_names(tmp_path / "combined.safetensors") == module_names(converted["kohya_sd15"])
