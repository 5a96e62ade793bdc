"""Flux.2 (issue 21), against diffusers at every step.

- Tables: each variant's BFL names (fused double-block qkv, `linear1`/`linear2`, the shared
  modulations, q/k norms as `.scale`, the final modulation with swapped halves), fed through diffusers'
  own `convert_flux2_transformer_checkpoint_to_diffusers` at full size, give back exactly the diffusers
  model's weight keys with the right rows.
- A LoRA saved by diffusers itself (`Flux2LoraLoaderMixin.save_lora_weights`) on a tiny FLUX.2
  [dev]-shaped transformer (real module names, narrow widths) is read as `flux2`. Our kohya and ComfyUI
  outputs, fed through diffusers' Flux.2 LoRA converters, give back its updates; merged into the
  model's diffusers folder it equals diffusers' `fuse_lora`; merged into the original single file it
  equals that after diffusers' single-file converter. OneTrainer's and SimpleTuner's LyCORIS names
  read as the same LoRA.
- Real widths pick the variant (and keep Flux.1 LoRAs Flux.1) where the names overlap.

diffusers' Flux.2 LoRA loading, as pinned (documented where each test works around it):
`Flux2LoraLoaderMixin.lora_state_dict` sends every file with a `.lora_down.weight` key to
`_convert_kohya_flux2_lora_to_diffusers`, which knows only `lora_unet_` names: a `diffusion_model.` +
`lora_down` file (ComfyUI's layout, diffusion-pipe's) comes back empty, with only a warning. That
kohya converter also drops `guidance_in`, the three shared modulations and
`final_layer.adaLN_modulation.1`. `_convert_non_diffusers_flux2_lora_to_diffusers` (reached for
`diffusion_model.` + `lora_A` files) reads no `alpha` (an alpha key is a ValueError), and maps
`final_layer.adaLN_modulation.1` to `norm_out.linear` without swapping its halves, which the
single-file converter does swap for the base weight.
"""

from __future__ import annotations

import json

import pytest
import torch
from dit_oracle import assert_folder_merge_is_fuse, assert_single_file_merge_is_fuse, tiny_dit
from safetensors.torch import load_file, save_file
from test_archs import _rows_marker
from test_merge_diffusers import base_checkpoint

import loratool
from loratool.archs import get_architecture

diffusers = pytest.importorskip("diffusers")
from diffusers import Flux2Transformer2DModel  # noqa: E402
from diffusers.loaders.lora_pipeline import Flux2LoraLoaderMixin  # noqa: E402
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers  # noqa: E402

VARIANTS = ("flux2", "flux2-klein-4b", "flux2-klein-9b")
TINY = dict(
    patch_size=1,
    in_channels=8,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=16,
    timestep_guidance_channels=16,
    axes_dims_rope=(2, 2, 2, 2),
)
DOUBLE_TARGETS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_out.0",
    "attn.to_add_out",
    "ff.linear_in",
    "ff.linear_out",
    "ff_context.linear_in",
    "ff_context.linear_out",
]
SINGLE_TARGETS = ["attn.to_qkv_mlp_proj", "attn.to_out"]
TOP_TARGETS = [
    "x_embedder",
    "context_embedder",
    "time_guidance_embed.timestep_embedder.linear_1",
    "time_guidance_embed.guidance_embedder.linear_2",
    "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.linear",
    "single_stream_modulation.linear",
    "norm_out.linear",
    "proj_out",
]
# What diffusers' kohya Flux.2 converter leaves out (it logs them as unsupported).
KOHYA_DROPPED = {
    "time_guidance_embed.guidance_embedder.linear_2",
    "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.linear",
    "single_stream_modulation.linear",
    "norm_out.linear",
}


def _config_of(variant: str) -> dict:
    from loratool.archs.families import flux2

    return {"flux2": flux2.FLUX2_DEV, "flux2-klein-4b": flux2.FLUX2_KLEIN_4B, "flux2-klein-9b": flux2.FLUX2_KLEIN_9B}[
        variant
    ]


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    half = t.shape[0] // 2
    return torch.cat([t[half:], t[:half]])


@pytest.mark.parametrize("variant", VARIANTS)
def test_original_names_fused_rows_and_swaps_match_diffusers_converter(variant: str) -> None:
    """diffusers' Flux.2 single-file converter reads bare BFL keys only (it strips no prefix)."""
    arch = get_architecture(variant)
    checkpoint, expected = {}, {}
    specs = [s for s in arch.modules.values() if s.component == "transformer"]
    for marker, spec in enumerate(specs, 1):
        if spec.fused is not None:
            continue
        rows = spec.shape[0]
        weight = _rows_marker(marker, rows)
        if spec.type == "norm":
            assert spec.native_weight.endswith(".scale")
            checkpoint[spec.native_weight] = expected[spec.path + ".weight"] = weight[:, 0]
            continue
        checkpoint[spec.native_weight] = weight
        expected[spec.path + ".weight"] = swap_halves(weight) if spec.rows else weight
    for marker, group in enumerate(arch.fused.values(), 10_000):
        parts = [arch.modules[p] for p in group.parts]
        fused = _rows_marker(marker, sum(p.shape[0] for p in parts))
        checkpoint[group.weight] = fused
        for spec, block in zip(parts, torch.split(fused, [p.shape[0] for p in parts]), strict=True):
            expected[spec.path + ".weight"] = block
    assert {s.path for s in specs if s.rows == "swap_halves"} == {"norm_out.linear"}
    assert {g.native.split(".", 2)[2] for g in arch.fused.values()} == {"img_attn.qkv", "txt_attn.qkv"}
    config = _config_of(variant)
    norms = 4 * config["num_layers"] + 2 * config["num_single_layers"]
    assert sum(1 for s in specs if s.type == "norm") == norms

    converted = convert_flux2_transformer_checkpoint_to_diffusers(dict(checkpoint))
    assert set(converted) == set(expected)
    assert not [k for k, v in expected.items() if not torch.equal(converted[k], v)]
    with torch.device("meta"):
        model = Flux2Transformer2DModel(**json.loads(json.dumps(config)))
    assert set(converted) == set(model.state_dict())  # Flux.2 has no biases: weights are everything


# -- a LoRA diffusers saved, on a tiny FLUX.2 [dev]-shaped transformer ---------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """The tiny model as a diffusers folder and as its original single file (bare BFL keys); a
    diffusers-saved LoRA on every Linear; and diffusers' fused weights with it."""
    root = tmp_path_factory.mktemp("flux2")
    torch.manual_seed(0)
    model = Flux2Transformer2DModel(**TINY)
    single = root / "flux2_tiny.safetensors"
    checkpoint = base_checkpoint(get_architecture("flux2"), {"transformer": model})
    save_file(checkpoint, str(single))
    targets = [f"transformer_blocks.{i}.{t}" for i in range(TINY["num_layers"]) for t in DOUBLE_TARGETS]
    targets += [f"single_transformer_blocks.{i}.{t}" for i in range(TINY["num_single_layers"]) for t in SINGLE_TARGETS]
    targets += TOP_TARGETS
    dit = tiny_dit(root, model, "Flux2Pipeline", Flux2LoraLoaderMixin, targets)
    return dict(folder=dit.folder, single=single, lora=dit.lora, before=dit.before, fused=dit.fused, targets=targets)


def updates(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """module -> B @ A of a diffusers-named LoRA state dict (`transformer.` keys, scales baked in)."""
    return {
        key.removesuffix(".lora_A.weight"): state[key.replace(".lora_A.", ".lora_B.")].double() @ down.double()
        for key, down in state.items()
        if key.endswith(".lora_A.weight")
    }


def assert_same_updates(theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], missing: set[str]) -> None:
    """`theirs` has every module of `ours` but `missing`; what it has beyond `ours` is a zero update
    (the absent row blocks of a fused qkv written whole)."""
    assert set(ours) - set(theirs) == {"transformer." + m for m in missing}
    assert not [k for k in set(theirs) - set(ours) if theirs[k].any()]
    for key in set(ours) & set(theirs):
        torch.testing.assert_close(
            theirs[key], ours[key].double(), rtol=1e-5, atol=1e-7, msg=lambda m, k=key: f"{k}: {m}"
        )


def test_diffusers_lora_is_read_as_flux2(tiny) -> None:
    report = loratool.inspect(tiny["lora"])
    assert report.format == "diffusers" and report.architecture == "flux2"
    assert {m.name.removeprefix("transformer.") for m in report.modules} == set(tiny["targets"])
    assert not [f for f in report.findings if f.severity == "error"]


def test_kohya_output_through_diffusers_kohya_converter_is_our_update(tiny, tmp_path) -> None:
    from deltas import deltas

    out = tmp_path / "kohya.safetensors"
    loratool.convert(tiny["lora"], "kohya", out)
    tensors = load_file(str(out))
    for name in ("double_blocks_0_img_attn_qkv", "single_blocks_1_linear1", "double_stream_modulation_txt_lin"):
        assert f"lora_unet_{name}.lora_down.weight" in tensors
    assert loratool.inspect(out).architecture == "flux2"
    # diffusers' own entry point; it bakes alpha / rank in and drops what it has no name for.
    theirs = updates(Flux2LoraLoaderMixin.lora_state_dict(dict(tensors)))
    assert_same_updates(theirs, deltas(tiny["lora"]), KOHYA_DROPPED)
    back = tmp_path / "back.safetensors"
    loratool.convert(out, "diffusers", back)
    want, got = deltas(tiny["lora"]), deltas(back)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)


def test_comfyui_output_through_diffusers_bfl_converter_is_our_update(tiny, tmp_path) -> None:
    from deltas import deltas

    out = tmp_path / "comfyui.safetensors"
    loratool.convert(tiny["lora"], "comfyui", out)
    tensors = load_file(str(out))
    assert "diffusion_model.double_blocks.0.txt_attn.qkv.lora_down.weight" in tensors
    assert "diffusion_model.final_layer.adaLN_modulation.1.lora_up.weight" in tensors
    assert loratool.inspect(out).architecture == "flux2"
    # diffusers quirk: `lora_down` sends the file to its kohya converter, which knows only `lora_unet_`
    # names and returns nothing. Its BFL converter is reached with `lora_A`/`lora_B` names and no alpha:
    # give it those, alpha / rank baked into A.
    assert Flux2LoraLoaderMixin.lora_state_dict(dict(tensors)) == {}
    bfl = {}
    for key, value in tensors.items():
        module, _, suffix = key.partition(".lora_")
        if suffix == "down.weight":
            alpha = tensors.get(module + ".alpha", torch.tensor(float(value.shape[0])))
            bfl[module + ".lora_A.weight"] = value * (alpha / value.shape[0])
        elif suffix == "up.weight":
            bfl[module + ".lora_B.weight"] = value
    theirs = updates(Flux2LoraLoaderMixin.lora_state_dict(bfl))
    # diffusers quirk: it maps final_layer.adaLN_modulation.1 to norm_out.linear without swapping the
    # (shift, scale) halves its single-file converter swaps in the base weight.
    theirs["transformer.norm_out.linear"] = swap_halves(theirs["transformer.norm_out.linear"])
    assert_same_updates(theirs, deltas(tiny["lora"]), set())
    back = tmp_path / "back.safetensors"
    loratool.convert(out, "diffusers", back)
    want, got = deltas(tiny["lora"]), deltas(back)
    assert set(want) <= set(got) and not [k for k in set(got) - set(want) if got[k].any()]
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)


def test_merge_into_the_diffusers_folder_equals_fuse_lora(tiny, tmp_path) -> None:
    assert_folder_merge_is_fuse(
        tiny["folder"], tiny["lora"], tiny["before"], tiny["fused"], tiny["targets"], tmp_path / "merged"
    )


def test_merge_into_the_original_single_file_equals_fuse_lora_after_diffusers_converter(tiny, tmp_path) -> None:
    base = convert_flux2_transformer_checkpoint_to_diffusers(load_file(str(tiny["single"])))
    assert set(base) == set(tiny["before"])
    assert not [k for k, v in base.items() if not torch.equal(v, tiny["before"][k])]
    assert_single_file_merge_is_fuse(
        tiny["single"], tiny["lora"], tiny["fused"], convert_flux2_transformer_checkpoint_to_diffusers, tmp_path
    )


@pytest.mark.parametrize("prefix", ["lora_transformer_", "lycoris_"])
def test_onetrainer_and_simpletuner_names_read_as_the_same_lora(tiny, tmp_path, prefix: str) -> None:
    """OneTrainer (`lora_transformer_`) and SimpleTuner's LyCORIS (`lycoris_`): the diffusers path with
    underscores, kohya tensor names and an alpha per module."""
    from deltas import deltas

    scales = {m.name: m.scale for m in loratool.inspect(tiny["lora"]).modules}
    renamed = {}
    for key, value in load_file(str(tiny["lora"])).items():
        module, _, factor = key.rpartition(".lora_")
        name = prefix + module.removeprefix("transformer.").replace(".", "_")
        if factor.startswith("A"):
            renamed[name + ".lora_down.weight"] = value
            renamed[name + ".alpha"] = torch.tensor(scales[module] * value.shape[0])
        else:
            renamed[name + ".lora_up.weight"] = value
    path = tmp_path / "renamed.safetensors"
    save_file(renamed, str(path))
    assert loratool.inspect(path).architecture == "flux2"
    want, got = deltas(tiny["lora"]), deltas(path)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7)


# -- real widths ---------------------------------------------------------------------------------------------
def _zeros_lora(path, modules: dict[str, tuple[int, int]], kohya: bool = False) -> None:
    """A rank-4 LoRA of zeros on `modules` ({name: (out, in)}), diffusers or kohya tensor names."""
    tensors = {}
    for name, (rows, cols) in modules.items():
        down, up = (".lora_down.weight", ".lora_up.weight") if kohya else (".lora_A.weight", ".lora_B.weight")
        tensors[name + down] = torch.zeros(4, cols)
        tensors[name + up] = torch.zeros(rows, 4)
    save_file(tensors, str(path))


@pytest.mark.parametrize("variant", VARIANTS)
def test_real_widths_pick_the_flux2_variant(variant: str, tmp_path) -> None:
    """Block 0's names are in all three tables (and its attention in Flux.1's): the widths decide."""
    config = _config_of(variant)
    w = config["num_attention_heads"] * config["attention_head_dim"]
    mlp = int(w * config["mlp_ratio"])
    diffusers_names = {
        "transformer.transformer_blocks.0.ff.linear_in": (2 * mlp, w),
        "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj": (3 * w + 2 * mlp, w),
    }
    _zeros_lora(tmp_path / "d.safetensors", diffusers_names)
    assert loratool.inspect(tmp_path / "d.safetensors").architecture == variant
    # musubi-tuner's names are Flux.1's too (double_blocks_0_img_attn_qkv, single_blocks_0_linear1)
    kohya_names = {
        "lora_unet_double_blocks_0_img_attn_qkv": (3 * w, w),
        "lora_unet_single_blocks_0_linear1": (3 * w + 2 * mlp, w),
    }
    _zeros_lora(tmp_path / "k.safetensors", kohya_names, kohya=True)
    assert loratool.inspect(tmp_path / "k.safetensors").architecture == variant


def test_flux1_loras_stay_flux1(tmp_path) -> None:
    """Flux.1's diffusers and kohya names at its widths (3072, the klein 4B width too) are Flux.1."""
    _zeros_lora(
        tmp_path / "d.safetensors",
        {
            "transformer.transformer_blocks.0.attn.to_q": (3072, 3072),
            "transformer.transformer_blocks.0.ff.net.0.proj": (12288, 3072),
        },
    )
    assert loratool.inspect(tmp_path / "d.safetensors").architecture == "flux1"
    _zeros_lora(
        tmp_path / "k.safetensors",
        {"lora_unet_double_blocks_0_img_attn_qkv": (9216, 3072), "lora_unet_single_blocks_0_linear1": (21504, 3072)},
        kohya=True,
    )
    assert loratool.inspect(tmp_path / "k.safetensors").architecture == "flux1"
