"""Chroma (issue 21), against diffusers at every step.

- The table's original (BFL) names, fed through diffusers' own
  `convert_chroma_transformer_checkpoint_to_diffusers` at full size, give back exactly the diffusers
  model's keys, the fused qkv and `linear1` rows and the approximator's `scale` norms where they belong.
- A LoRA saved by diffusers (`FluxLoraLoaderMixin`, which ChromaPipeline uses) on a tiny Chroma
  transformer (real module names, narrow widths), the guidance approximator included, is read as
  Chroma; our kohya output, through diffusers' kohya Flux converter (what ChromaPipeline's
  `load_lora_weights` runs), gives back our diffusers file's updates for every module that converter
  knows; merged into the diffusers folder it equals `load_lora_adapter` + `fuse_lora`; merged into the
  original single file it equals that after diffusers' single-file converter.
- A LoRA on the modules Chroma shares with Flux.1 fits both at every width: it is reported as tied,
  converts the same way under either reading, and its metadata settles it.
"""

from __future__ import annotations

import pytest
import torch
from dit_oracle import assert_folder_merge_is_fuse, tiny_dit
from safetensors.torch import load_file, save_file
from test_archs import _rows_marker
from test_merge_diffusers import base_checkpoint

import loratool
from loratool.archs import get_architecture

diffusers = pytest.importorskip("diffusers")
from diffusers import ChromaTransformer2DModel  # noqa: E402
from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers  # noqa: E402
from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin  # noqa: E402
from diffusers.loaders.single_file_utils import convert_chroma_transformer_checkpoint_to_diffusers  # noqa: E402

TINY = dict(
    patch_size=1,
    in_channels=8,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=16,
    axes_dims_rope=(2, 2, 4),
    approximator_num_channels=8,
    approximator_hidden_dim=24,
    approximator_layers=2,
)
DOUBLE = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.add_q_proj",
    "attn.to_out.0",
    "ff.net.0.proj",
    "ff_context.net.2",
]
SINGLE = ["attn.to_q", "attn.to_v", "proj_mlp", "proj_out"]
TOP = [
    "x_embedder",
    "context_embedder",
    "proj_out",
    "distilled_guidance_layer.in_proj",
    "distilled_guidance_layer.layers.0.linear_1",
    "distilled_guidance_layer.layers.1.linear_2",
]
# What diffusers' kohya Flux converter cannot take: Chroma's approximator (no names for it), and a
# single block's `linear1` at other than full-size widths (it splits at 3 x 3072 + 12288 rows).
NOT_IN_FLUX_CONVERTER = ("distilled_guidance_layer", "linear1")


def test_original_names_fused_rows_and_norms_match_diffusers_converter() -> None:
    arch = get_architecture("chroma")
    checkpoint, expected = {}, {}
    specs = [s for s in arch.modules.values() if s.component == "transformer"]
    for marker, spec in enumerate(specs, 1):
        if spec.fused is not None:
            continue
        rows = spec.shape[0]
        if spec.type == "norm":
            checkpoint[spec.native_weight] = expected[spec.path + ".weight"] = _rows_marker(marker, rows)[:, 0]
            continue
        weight = _rows_marker(marker, rows)
        checkpoint[spec.native_weight] = expected[spec.path + ".weight"] = weight
        checkpoint[spec.native + ".bias"] = weight[:, 0].clone()
    for marker, group in enumerate((g for g in arch.fused.values() if g.component == "transformer"), 10_000):
        parts = [arch.modules[p] for p in group.parts]
        fused = _rows_marker(marker, sum(p.shape[0] for p in parts))
        checkpoint[group.weight] = fused
        checkpoint[group.weight.removesuffix("weight") + "bias"] = fused[:, 0].clone()
        start = 0
        for spec in parts:
            expected[spec.path + ".weight"] = fused[start : start + spec.shape[0]]
            start += spec.shape[0]
    assert not [s for s in specs if s.rows]  # Chroma prunes the final modulation Flux.1 stores swapped

    converted = convert_chroma_transformer_checkpoint_to_diffusers(dict(checkpoint))
    weights = {k: v for k, v in converted.items() if k.endswith(".weight")}
    assert set(weights) == set(expected)
    assert not [k for k, v in expected.items() if not torch.equal(weights[k], v)]
    with torch.device("meta"):
        model = ChromaTransformer2DModel()  # diffusers' defaults are Chroma1-HD's config
    assert set(weights) == {k for k in model.state_dict() if k.endswith(".weight")}


# -- a LoRA diffusers saved, on a tiny Chroma transformer ------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("chroma")
    torch.manual_seed(0)
    model = ChromaTransformer2DModel(**TINY)
    single = root / "chroma_tiny.safetensors"
    save_file(base_checkpoint(get_architecture("chroma"), {"transformer": model}), str(single))
    targets = [f"transformer_blocks.{i}.{t}" for i in range(2) for t in DOUBLE]
    targets += [f"single_transformer_blocks.{i}.{t}" for i in range(2) for t in SINGLE] + TOP
    dit = tiny_dit(root, model, "ChromaPipeline", FluxLoraLoaderMixin, targets)
    return dict(folder=dit.folder, single=single, lora=dit.lora, before=dit.before, fused=dit.fused, targets=targets)


def test_diffusers_lora_is_read_as_chroma(tiny) -> None:
    report = loratool.inspect(tiny["lora"])
    assert report.format == "diffusers" and report.architecture == "chroma"
    assert {m.name.removeprefix("transformer.") for m in report.modules} == set(tiny["targets"])
    assert not [f for f in report.findings if f.severity == "error"]


def test_kohya_output_through_diffusers_flux_converter_is_our_diffusers_file(tiny, tmp_path) -> None:
    from deltas import deltas

    ours = deltas(tiny["lora"])
    kohya = tmp_path / "kohya.safetensors"
    loratool.convert(tiny["lora"], "kohya", kohya)
    tensors = load_file(str(kohya))
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in tensors
    assert "lora_unet_distilled_guidance_layer_layers_0_in_layer.lora_down.weight" in tensors
    # what diffusers' kohya Flux converter cannot take is left to merge's oracle
    known = {k: v for k, v in tensors.items() if not any(n in k for n in NOT_IN_FLUX_CONVERTER)}
    theirs = _convert_kohya_flux_lora_to_diffusers(dict(known))
    got = {}
    for key, down in theirs.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            got[module.removeprefix("transformer.")] = theirs[module + ".lora_B.weight"].double() @ down.double()
    linear1 = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    want = {
        k.removeprefix("transformer."): v
        for k, v in ours.items()
        if ".distilled_guidance_layer." not in k and not (".single_transformer_blocks." in k and k.endswith(linear1))
    }
    # diffusers drops the final layer's alpha (it "consumes leftover final_layer alpha keys"): its
    # update comes back without alpha / rank, which is put back here
    scales = {m.name: m.scale for m in loratool.inspect(kohya).modules}
    got["proj_out"] = got["proj_out"] * scales["lora_unet_final_layer_linear"]
    # a fused qkv splits into all three parts: those the LoRA left out come back as zero updates
    assert set(want) <= set(got) and not [k for k in set(got) - set(want) if got[k].any()]
    for module, value in want.items():
        torch.testing.assert_close(
            got[module], value.double(), rtol=1e-5, atol=1e-7, msg=lambda m, k=module: f"{k}: {m}"
        )
    for to in ("kohya", "comfyui"):
        out = tmp_path / f"{to}_again.safetensors"
        loratool.convert(tiny["lora"], to, out)
        assert loratool.inspect(out).architecture == "chroma"
        back = tmp_path / f"{to}_back.safetensors"
        loratool.convert(out, "diffusers", back)
        for module, value in deltas(back).items():
            torch.testing.assert_close(value, ours[module], rtol=1e-5, atol=1e-6)


def test_merge_into_the_diffusers_folder_equals_fuse_lora(tiny, tmp_path) -> None:
    assert_folder_merge_is_fuse(
        tiny["folder"], tiny["lora"], tiny["before"], tiny["fused"], tiny["targets"], tmp_path / "merged"
    )


def chroma_components(checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' single-file converter, with `linear1` split at the tiny model's widths: it splits at
    (3072, 3072, 3072, 12288) whatever the checkpoint holds, so it gets an empty stand-in of that
    height and its four outputs are replaced here (as test_merge_diffusers does for Flux.1)."""
    inner = TINY["num_attention_heads"] * TINY["attention_head_dim"]
    widths = (inner, inner, inner, 4 * inner)
    linear1 = {k: v for k, v in checkpoint.items() if ".linear1." in k}
    stand_in = {k: torch.empty(7 * 3072, 0) if k.endswith("weight") else torch.empty(7 * 3072) for k in linear1}
    out = convert_chroma_transformer_checkpoint_to_diffusers({**checkpoint, **stand_in})
    for key, value in linear1.items():
        block, kind = f"single_transformer_blocks.{key.split('.')[1]}", key.rsplit(".", 1)[1]
        parts = (f"{block}.attn.to_q", f"{block}.attn.to_k", f"{block}.attn.to_v", f"{block}.proj_mlp")
        for part, piece in zip(parts, torch.split(value, widths), strict=True):
            out[f"{part}.{kind}"] = piece
    return out


def test_merge_into_the_original_single_file_equals_fuse_lora_after_diffusers_converter(tiny, tmp_path) -> None:
    comfy = tmp_path / "comfyui.safetensors"
    loratool.convert(tiny["lora"], "comfyui", comfy)
    assert any(
        k.startswith("diffusion_model.distilled_guidance_layer.layers.0.in_layer.") for k in load_file(str(comfy))
    )
    for lora in (tiny["lora"], comfy):
        out = tmp_path / f"merged_{lora.stem}.safetensors"
        loratool.merge(tiny["single"], [lora], out, device="cpu")
        converted = chroma_components(load_file(str(out)))
        assert {k for k in tiny["fused"] if k.endswith(".weight")} == {k for k in converted if k.endswith(".weight")}
        for key, value in tiny["fused"].items():
            torch.testing.assert_close(converted[key], value, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


# -- what Chroma shares with Flux.1 ------------------------------------------------------------------------------
def _shared_lora(path, width: int, metadata: dict[str, str] | None = None) -> None:
    tensors = {}
    for i in range(2):
        for part, rows in (("attn.to_q", width), ("ff.net.0.proj", 4 * width)):  # Qwen-Image's MLP is img_mlp
            key = f"transformer.transformer_blocks.{i}.{part}"
            tensors[f"{key}.lora_A.weight"] = torch.zeros(4, width)
            tensors[f"{key}.lora_B.weight"] = torch.zeros(rows, 4)
    save_file(tensors, str(path), metadata=metadata)


def test_modules_chroma_shares_with_flux1_tie_convert_alike_and_metadata_settles_them(tmp_path) -> None:
    shared = tmp_path / "shared.safetensors"
    _shared_lora(shared, 3072)
    report = loratool.inspect(shared)
    assert report.architecture == "flux1" and "ambiguous between flux1, chroma" in report.architecture_reason
    out = tmp_path / "shared_kohya.safetensors"
    loratool.convert(shared, "kohya", out)  # both readings give the same names: no refusal
    assert "lora_unet_double_blocks_1_img_mlp_0.lora_down.weight" in load_file(str(out))
    named = tmp_path / "named.safetensors"
    _shared_lora(named, 3072, {"ss_base_model_version": "chroma"})
    assert loratool.inspect(named).architecture == "chroma"
    own = tmp_path / "own.safetensors"  # a module only Chroma has
    _shared_lora(own, 3072)
    tensors = load_file(str(own))
    tensors["transformer.distilled_guidance_layer.in_proj.lora_A.weight"] = torch.zeros(4, 64)
    tensors["transformer.distilled_guidance_layer.in_proj.lora_B.weight"] = torch.zeros(5120, 4)
    save_file(tensors, str(own))
    assert loratool.inspect(own).architecture == "chroma"


def test_a_lora_tied_between_flux1_and_chroma_is_read_as_its_base_family(tiny, tmp_path) -> None:
    """A LoRA on the modules Chroma shares with Flux.1 (here at the tiny model's widths, whose ratios are
    Flux.1's too) is checked against a Chroma base as a Chroma LoRA: no base mismatch, every module found."""
    shared = {k: v for k, v in load_file(str(tiny["lora"])).items() if ".transformer_blocks." in k}
    path = tmp_path / "shared_tiny.safetensors"
    save_file(shared, str(path))
    alone = loratool.inspect(path)
    assert alone.architecture == "flux1" and "ambiguous between flux1, chroma" in alone.architecture_reason
    report = loratool.inspect(path, base=tiny["single"])
    assert report.architecture == "chroma" and "the base is Chroma" in report.architecture_reason
    assert not [f for f in report.findings if f.severity == "error"], report.findings
