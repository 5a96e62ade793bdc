"""Wan 2.1 / 2.2 (issue 22), against diffusers at every step.

- Tables: every variant's original (single-file) names, fed through diffusers' own
  `convert_wan_transformer_to_diffusers` at full size, give back exactly the diffusers model's keys
  (VACE's through the same converter, which `WanVACETransformer3DModel` uses).
- A LoRA saved by diffusers itself (`WanLoraLoaderMixin.save_lora_weights`) on a tiny Wan 2.1
  I2V-shaped transformer (real module names, narrow widths, image cross-attention and `img_emb`, the
  Conv3d patch embedding adapted too) is read as Wan 2.1 I2V; our kohya output fed through diffusers'
  musubi-tuner converter and our ComfyUI output fed through its non-diffusers Wan converter are the
  same update; merged into the diffusers folder it equals diffusers' `fuse_lora`, merged into the
  original single file it equals that after diffusers' single-file converter.
- DiffSynth-Studio, OneTrainer, SimpleTuner LyCORIS and Wan-Fun (`lora_unet__`) names read as the
  same LoRA; real widths tell 1.3B, 5B and 14B apart, T2V from I2V, and the VACE models.
- A lightx2v-style distillation LoRA (`.diff`/`.diff_b` on norms and the head) reads and merges as
  W + diff, b + diff_b.

Quirks of diffusers' converters worked around here:
- the musubi-tuner converter takes only block modules, every one of them (q, k, v, o of both
  attentions, k_img/v_img when any block has them, ffn.0, ffn.2) in every block from 0 on, each with an
  alpha: it is given our kohya file's block modules (all adapted in the tiny LoRA);
- the non-diffusers converter reads `.alpha` only inside the blocks: outside them (time/text
  embeddings, time_projection, head, img_emb) an alpha is left over and raises ValueError, so those
  modules are given with alpha / rank folded into lora_down; it has no rule for `patch_embedding`
  (also a ValueError), which is left out of what it is given.
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
from loratool.errors import ConversionError, MergeError

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel, WanVACETransformer3DModel  # noqa: E402
from diffusers.loaders.lora_conversion_utils import (  # noqa: E402
    _convert_musubi_wan_lora_to_diffusers,
    _convert_non_diffusers_wan_lora_to_diffusers,
)
from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin  # noqa: E402
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers  # noqa: E402

I2V = "wan2.1-i2v-14b"
VARIANTS = (
    "wan2.1-t2v-1.3b",
    "wan2.1-vace-1.3b",
    "wan2.1-t2v-14b",
    "wan2.1-vace-14b",
    "wan2.1-i2v-14b",
    "wan2.2-i2v-a14b",
    "wan2.2-ti2v-5b",
)
# Narrow, with the I2V model's modules: image cross-attention (add_k_proj/add_v_proj, norm_added_k) and
# the image embedder; added_kv_proj_dim is the inner width, as in the published model (5120).
TINY = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=8,
    ffn_dim=32,
    num_layers=2,
    image_dim=12,
    added_kv_proj_dim=16,
    rope_max_seq_len=32,
)
BLOCK_TARGETS = [
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "attn2.add_k_proj",
    "attn2.add_v_proj",
    "ffn.net.0.proj",
    "ffn.net.2",
]
TOP_TARGETS = [
    "patch_embedding",  # Conv3d
    "condition_embedder.time_embedder.linear_1",
    "condition_embedder.time_embedder.linear_2",
    "condition_embedder.time_proj",
    "condition_embedder.text_embedder.linear_1",
    "condition_embedder.text_embedder.linear_2",
    "condition_embedder.image_embedder.ff.net.0.proj",
    "condition_embedder.image_embedder.ff.net.2",
    "proj_out",
]


def _config_of(variant: str) -> dict:
    from loratool.archs.families import wan

    configs = {
        "wan2.1-t2v-1.3b": wan.WAN21_T2V_1_3B,
        "wan2.1-vace-1.3b": wan.WAN21_VACE_1_3B,
        "wan2.1-t2v-14b": wan.WAN21_T2V_14B,
        "wan2.1-vace-14b": wan.WAN21_VACE_14B,
        "wan2.1-i2v-14b": wan.WAN21_I2V_14B,
        "wan2.2-i2v-a14b": wan.WAN22_I2V_A14B,
        "wan2.2-ti2v-5b": wan.WAN22_TI2V_5B,
    }
    return json.loads(json.dumps(configs[variant]))


def modulations(keys) -> dict[str, str]:
    """The model's modulation parameters (not modules: no rows), original name -> diffusers name:
    `blocks.N.modulation` and `vace_blocks.N.modulation` are each block's `scale_shift_table`,
    `head.modulation` the output's."""
    out = {"head.modulation": "scale_shift_table"}
    for key in keys:
        if key.endswith(".scale_shift_table") and key != "scale_shift_table":
            out[key.replace(".scale_shift_table", ".modulation")] = key
    return out


# -- the tables against diffusers' single-file converter, at full size ------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_original_names_match_diffusers_converter(variant: str) -> None:
    arch = get_architecture(variant)
    config = _config_of(variant)
    with torch.device("meta"):
        cls = WanVACETransformer3DModel if "vace_layers" in config else WanTransformer3DModel
        keys = set(cls(**config).state_dict())
    specs = [s for s in arch.modules.values() if s.component == "transformer"]
    assert not arch.fused and not [s for s in specs if s.rows or s.weight or s.native is None]
    checkpoint, expected = {}, {}
    for marker, spec in enumerate(specs, 1):
        weight = _rows_marker(marker, spec.shape[0])
        if spec.type == "norm":
            weight = weight[:, 0]
        checkpoint[spec.native_weight] = expected[spec.path + ".weight"] = weight
        if spec.path + ".bias" in keys:
            checkpoint[spec.native + ".bias"] = expected[spec.path + ".bias"] = _rows_marker(-marker, spec.shape[0])[
                :, 0
            ]
    for marker, (original, name) in enumerate(modulations(keys).items(), 100_000):
        checkpoint[original] = expected[name] = torch.full((1, 1), marker)
    # Every original name is the one Wan-AI's files use (the converter would pass an unknown one through).
    assert {s.native for s in specs if s.path.endswith("attn2.add_k_proj")} == (
        {f"blocks.{i}.cross_attn.k_img" for i in range(40)} if variant == I2V else set()
    )

    converted = convert_wan_transformer_to_diffusers(dict(checkpoint))
    assert set(converted) == set(expected) == keys
    assert not [k for k, v in expected.items() if not torch.equal(converted[k], v)]


def test_variants_differ_where_the_published_models_do() -> None:
    """Widths, depth and input channels of each table, and the modules only some have."""
    facts = {}
    for variant in VARIANTS:
        arch = get_architecture(variant)
        modules = arch.modules
        facts[variant] = (
            modules["transformer.blocks.0.attn1.to_q"].shape[0],
            sum(1 for m in modules if m.endswith(".attn1.to_q") and ".vace_blocks." not in m),
            sum(1 for m in modules if m.startswith("transformer.vace_blocks.") and m.endswith(".attn1.to_q")),
            modules["transformer.patch_embedding"].shape,
            "transformer.blocks.0.attn2.add_k_proj" in modules,
        )
    assert facts == {
        "wan2.1-t2v-1.3b": (1536, 30, 0, (1536, 16, 1, 2, 2), False),
        "wan2.1-vace-1.3b": (1536, 30, 15, (1536, 16, 1, 2, 2), False),
        "wan2.1-t2v-14b": (5120, 40, 0, (5120, 16, 1, 2, 2), False),
        "wan2.1-vace-14b": (5120, 40, 8, (5120, 16, 1, 2, 2), False),
        "wan2.1-i2v-14b": (5120, 40, 0, (5120, 36, 1, 2, 2), True),
        "wan2.2-i2v-a14b": (5120, 40, 0, (5120, 36, 1, 2, 2), False),
        "wan2.2-ti2v-5b": (3072, 30, 0, (3072, 48, 1, 2, 2), False),
    }
    # norms: q/k of both attentions and the cross-attention's LayerNorm (original norm3) in each block,
    # the image key norm and img_emb's two LayerNorms in I2V
    norms = {v: sum(1 for m in get_architecture(v).modules.values() if m.type == "norm") for v in VARIANTS}
    assert norms == {
        "wan2.1-t2v-1.3b": 30 * 5,
        "wan2.1-vace-1.3b": (30 + 15) * 5,
        "wan2.1-t2v-14b": 40 * 5,
        "wan2.1-vace-14b": (40 + 8) * 5,
        "wan2.1-i2v-14b": 40 * 6 + 2,
        "wan2.2-i2v-a14b": 40 * 5,
        "wan2.2-ti2v-5b": 30 * 5,
    }


def test_kohya_names_are_musubi_tuner_and_wan_fun_names() -> None:
    """musubi-tuner's networks.lora_wan: `lora_unet_` + the original path; VideoX-Fun: `lora_unet__`."""
    names = {
        ("wan2.1-t2v-14b", "lora_unet_blocks_0_self_attn_q"): "transformer.blocks.0.attn1.to_q",
        ("wan2.1-t2v-14b", "lora_unet_blocks_39_cross_attn_o"): "transformer.blocks.39.attn2.to_out.0",
        ("wan2.1-t2v-14b", "lora_unet_blocks_7_ffn_0"): "transformer.blocks.7.ffn.net.0.proj",
        ("wan2.1-t2v-14b", "lora_unet_head_head"): "transformer.proj_out",
        ("wan2.1-t2v-14b", "lora_unet__blocks_3_cross_attn_k"): "transformer.blocks.3.attn2.to_k",
        (I2V, "lora_unet_blocks_12_cross_attn_k_img"): "transformer.blocks.12.attn2.add_k_proj",
        (I2V, "lora_unet_img_emb_proj_1"): "transformer.condition_embedder.image_embedder.ff.net.0.proj",
        ("wan2.1-vace-1.3b", "lora_unet_vace_blocks_0_before_proj"): "transformer.vace_blocks.0.proj_in",
        ("wan2.1-vace-1.3b", "lora_unet_vace_blocks_14_after_proj"): "transformer.vace_blocks.14.proj_out",
    }
    for (variant, kohya), target in names.items():
        arch = get_architecture(variant)
        assert arch.kohya_network_module == "networks.lora_wan"
        assert arch.kohya_index[kohya] == (target,), kohya
    arch = get_architecture("wan2.1-t2v-14b")
    assert arch.kohya_name("transformer.blocks.0.attn2.to_q") == "lora_unet_blocks_0_cross_attn_q"
    assert arch.modules["transformer.blocks.0.norm2"].native == "blocks.0.norm3"
    assert arch.modules["transformer.blocks.0.attn1.to_q"].target == "default"
    assert arch.modules["transformer.condition_embedder.time_proj"].target == "extra"


# -- a LoRA diffusers saved, on a tiny Wan 2.1 I2V-shaped transformer ---------------------------------------------
def single_checkpoint(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model as Wan-AI's (and ComfyUI's) single file: original names, bare keys."""
    checkpoint = base_checkpoint(get_architecture(I2V), {"transformer": model})
    state = model.state_dict()
    for original, name in modulations(state).items():
        checkpoint[original] = state[name].detach().clone()
    return checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """The tiny model as a diffusers folder and as an original single file; a diffusers-saved LoRA; and
    diffusers' fused weights with it."""
    root = tmp_path_factory.mktemp("wan")
    torch.manual_seed(0)
    model = WanTransformer3DModel(**TINY)
    checkpoint = single_checkpoint(model)
    # The single file is complete: diffusers' converter turns it into exactly the model's state dict.
    state = model.state_dict()
    converted = convert_wan_transformer_to_diffusers(dict(checkpoint))
    assert set(converted) == set(state) and all(torch.equal(converted[k], state[k]) for k in state)
    single = root / "wan_tiny.safetensors"
    save_file(checkpoint, str(single))
    targets = [f"blocks.{i}.{t}" for i in range(TINY["num_layers"]) for t in BLOCK_TARGETS] + TOP_TARGETS
    dit = tiny_dit(root, model, "WanImageToVideoPipeline", WanLoraLoaderMixin, targets)
    return dict(
        folder=dit.folder,
        single=single,
        checkpoint=checkpoint,
        lora=dit.lora,
        before=dit.before,
        fused=dit.fused,
        targets=targets,
    )


def updates(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """module -> B @ A of a diffusers-named LoRA state dict (`transformer.` keys, alphas baked in)."""
    out = {}
    for key, down in state.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            out[module] = state[module + ".lora_B.weight"].double() @ down.double().flatten(1)
    return out


def test_diffusers_lora_is_read_as_wan21_i2v(tiny) -> None:
    report = loratool.inspect(tiny["lora"])
    assert report.format == "diffusers" and report.architecture == I2V
    assert {m.name.removeprefix("transformer.") for m in report.modules} == set(tiny["targets"])
    assert not [f for f in report.findings if f.severity == "error"]


def test_kohya_output_through_diffusers_musubi_converter(tiny, tmp_path) -> None:
    from deltas import deltas

    ours = deltas(tiny["lora"])
    out = tmp_path / "kohya.safetensors"
    loratool.convert(tiny["lora"], "kohya", out)
    tensors = load_file(str(out))
    assert "lora_unet_blocks_1_cross_attn_k_img.alpha" in tensors and "lora_unet_head_head.alpha" in tensors
    assert loratool.inspect(out).architecture == I2V
    blocks = {k: v for k, v in tensors.items() if k.startswith("lora_unet_blocks_")}  # all the converter reads
    theirs = updates(_convert_musubi_wan_lora_to_diffusers(blocks))
    assert set(theirs) == {k for k in ours if k.startswith("transformer.blocks.")}
    for module, value in theirs.items():
        torch.testing.assert_close(
            value, ours[module].double(), rtol=1e-5, atol=1e-7, msg=lambda m, k=module: f"{k}: {m}"
        )
    back = tmp_path / "kohya_back.safetensors"
    loratool.convert(out, "diffusers", back)
    for got in (deltas(out), deltas(back)):
        assert set(got) == set(ours)
        for key in ours:
            torch.testing.assert_close(got[key], ours[key], rtol=1e-5, atol=1e-6)


def for_non_diffusers_converter(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our ComfyUI file as diffusers' non-diffusers Wan converter can take it: alpha folded into
    lora_down outside the blocks (it reads alphas only inside them), patch_embedding left out (no rule)."""
    out = {}
    for key, value in tensors.items():
        module, _, tensor = key.partition(".lora_")
        if key.endswith(".alpha"):
            module, tensor = key.removesuffix(".alpha"), "alpha"
        if module == "diffusion_model.patch_embedding":
            continue
        if module.startswith("diffusion_model.blocks."):
            out[key] = value
        elif tensor == "down.weight":
            out[key] = value * (tensors[module + ".alpha"].item() / value.shape[0])
        elif tensor == "up.weight":
            out[key] = value
    return out


def test_comfyui_output_through_diffusers_non_diffusers_converter(tiny, tmp_path) -> None:
    from deltas import deltas

    ours = deltas(tiny["lora"])
    out = tmp_path / "comfyui.safetensors"
    loratool.convert(tiny["lora"], "comfyui", out)
    tensors = load_file(str(out))
    assert "diffusion_model.blocks.0.cross_attn.v_img.lora_down.weight" in tensors
    assert tensors["diffusion_model.patch_embedding.lora_down.weight"].dim() == 5  # Conv3d
    assert loratool.inspect(out).architecture == I2V
    theirs = updates(_convert_non_diffusers_wan_lora_to_diffusers(for_non_diffusers_converter(tensors)))
    assert set(theirs) == set(ours) - {"transformer.patch_embedding"}
    for module, value in theirs.items():
        torch.testing.assert_close(
            value, ours[module].double(), rtol=1e-5, atol=1e-7, msg=lambda m, k=module: f"{k}: {m}"
        )
    back = tmp_path / "comfyui_back.safetensors"
    loratool.convert(out, "diffusers", back)
    for got in (deltas(out), deltas(back)):
        assert set(got) == set(ours)
        for key in ours:
            torch.testing.assert_close(got[key], ours[key], rtol=1e-5, atol=1e-6)


def test_merge_into_the_diffusers_folder_equals_fuse_lora(tiny, tmp_path) -> None:
    assert_folder_merge_is_fuse(
        tiny["folder"], tiny["lora"], tiny["before"], tiny["fused"], tiny["targets"], tmp_path / "merged"
    )


def test_merge_into_the_original_single_file_equals_fuse_lora_after_diffusers_converter(tiny, tmp_path) -> None:
    assert_single_file_merge_is_fuse(
        tiny["single"], tiny["lora"], tiny["fused"], convert_wan_transformer_to_diffusers, tmp_path
    )


def test_diffsynth_lora_is_read_as_the_same_lora(tiny, tmp_path) -> None:
    """DiffSynth-Studio: bare original names, PEFT's adapter name in the key, no alpha (scale 1)."""
    from deltas import deltas

    arch = get_architecture(I2V)
    scales = {m.name: m.scale for m in loratool.inspect(tiny["lora"]).modules}
    diffsynth = {}
    for key, value in load_file(str(tiny["lora"])).items():
        module, _, factor = key.rpartition(".lora_")
        native = arch.modules[module].native
        side = factor.split(".")[0]  # A or B
        diffsynth[f"{native}.lora_{side}.default.weight"] = value * scales[module] if side == "A" else value
    path = tmp_path / "diffsynth.safetensors"
    save_file(diffsynth, str(path))
    report = loratool.inspect(path)
    assert report.format == "diffsynth" and report.architecture == I2V
    want, got = deltas(tiny["lora"]), deltas(path)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prefix", ["lora_transformer_", "lycoris_"])
def test_onetrainer_and_simpletuner_names_read_as_the_same_lora(tiny, tmp_path, prefix: str) -> None:
    """OneTrainer (`lora_transformer_`) and SimpleTuner's LyCORIS (`lycoris_`): the diffusers path with
    underscores, kohya tensor names, an alpha per module."""
    from deltas import deltas

    scales = {m.name.removeprefix("transformer."): m.scale for m in loratool.inspect(tiny["lora"]).modules}
    renamed = {}
    for key, value in load_file(str(tiny["lora"])).items():
        module, _, factor = key.removeprefix("transformer.").rpartition(".lora_")
        name = prefix + module.replace(".", "_")
        if factor.startswith("A"):
            renamed[f"{name}.lora_down.weight"] = value
            renamed[f"{name}.alpha"] = torch.tensor(scales[module] * value.shape[0])
        else:
            renamed[f"{name}.lora_up.weight"] = value
    path = tmp_path / "renamed.safetensors"
    save_file(renamed, str(path))
    assert loratool.inspect(path).architecture == I2V
    want, got = deltas(tiny["lora"]), deltas(path)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=0)


def test_wan_fun_double_underscore_names_read_as_the_same_lora(tiny, tmp_path) -> None:
    """VideoX-Fun (Wan-Fun) writes `lora_unet__` + the original path flattened; ComfyUI reads it."""
    from deltas import deltas

    kohya = tmp_path / "kohya.safetensors"
    loratool.convert(tiny["lora"], "kohya", kohya)
    renamed = {"lora_unet__" + k.removeprefix("lora_unet_"): v for k, v in load_file(str(kohya)).items()}
    path = tmp_path / "fun.safetensors"
    save_file(renamed, str(path))
    report = loratool.inspect(path)
    assert report.architecture == I2V and not [f for f in report.findings if f.severity == "error"]
    want, got = deltas(tiny["lora"]), deltas(path)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7)


# -- lightx2v-style distillation LoRAs ----------------------------------------------------------------------------
def distill_tensors(extra: str = "") -> dict[str, torch.Tensor]:
    """lightx2v's layout at the tiny model's widths: `diffusion_model.` + original names, LoRA factors with
    alpha, `.diff` (whole weight difference) and `.diff_b` (bias difference) on norms and the head. With
    `extra` "lora_bias", also a `.diff_b` beside a LoRA's factors (lightx2v: every adapted Linear); with
    "lone_bias", a `.diff_b` alone (AccVideo's time_projection, as diffusers' converter notes)."""
    g = torch.Generator().manual_seed(3)
    inner = TINY["num_attention_heads"] * TINY["attention_head_dim"]
    out_rows = TINY["out_channels"] * 4  # proj_out: out_channels x the 1x2x2 patch

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    p = "diffusion_model."
    tensors = {
        p + "blocks.0.self_attn.q.lora_down.weight": r(4, inner),
        p + "blocks.0.self_attn.q.lora_up.weight": r(inner, 4),
        p + "blocks.0.self_attn.q.alpha": torch.tensor(2.0),
        p + "blocks.1.ffn.2.lora_down.weight": r(4, TINY["ffn_dim"]),
        p + "blocks.1.ffn.2.lora_up.weight": r(inner, 4),
        p + "blocks.1.ffn.2.alpha": torch.tensor(8.0),
        p + "blocks.0.norm3.diff": r(inner),
        p + "blocks.0.norm3.diff_b": r(inner),
        p + "blocks.1.self_attn.norm_q.diff": r(inner),
        p + "blocks.1.cross_attn.norm_k_img.diff": r(inner),
        p + "head.head.diff": r(out_rows, inner),
        p + "head.head.diff_b": r(out_rows),
    }
    if extra == "lora_bias":
        tensors[p + "blocks.0.self_attn.q.diff_b"] = r(inner)
        tensors[p + "blocks.1.ffn.2.diff_b"] = r(inner)
    elif extra == "lone_bias":
        tensors[p + "time_projection.1.diff_b"] = r(inner * 6)
    return tensors


def expected_distill_merge(checkpoint: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> dict:
    """W + scale * up @ down for the LoRA modules, W + diff and b + diff_b (not scaled, as ComfyUI and
    diffusers apply it) for the rest, at strength 1."""
    p = "diffusion_model."
    want = {}
    for key, value in tensors.items():
        module, _, tensor = key.removeprefix(p).rpartition(".")
        if key.endswith(".lora_down.weight"):
            module = key.removeprefix(p).removesuffix(".lora_down.weight")
            up, alpha = tensors[p + module + ".lora_up.weight"], tensors[p + module + ".alpha"]
            want[module + ".weight"] = checkpoint[module + ".weight"] + alpha.item() / value.shape[0] * (up @ value)
        elif tensor == "diff":
            want[module + ".weight"] = checkpoint[module + ".weight"] + value
        elif tensor == "diff_b":
            want[module + ".bias"] = checkpoint[module + ".bias"] + value
    return want


def check_distill(tiny, tmp_path, tensors: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "distill.safetensors"
    save_file(tensors, str(path))
    report = loratool.inspect(path)
    assert report.architecture == I2V and not [f for f in report.findings if f.severity == "error"]
    out = tmp_path / "merged.safetensors"
    loratool.merge(tiny["single"], [path], out, device="cpu")
    got, want = load_file(str(out)), expected_distill_merge(tiny["checkpoint"], tensors)
    assert {k for k in got if not torch.equal(got[k], tiny["checkpoint"][k])} == set(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


def test_distill_lora_with_norm_and_head_diffs_reads_and_merges(tiny, tmp_path) -> None:
    tensors = distill_tensors()
    path = tmp_path / "kinds.safetensors"
    save_file(tensors, str(path))
    kinds = {m.name: m.kind for m in loratool.inspect(path).modules}
    assert kinds["diffusion_model.blocks.0.norm3"] == "full" and kinds["diffusion_model.head.head"] == "full"
    check_distill(tiny, tmp_path, tensors)


def test_distill_lora_with_bias_diffs_beside_lora_factors_reads_and_merges(tiny, tmp_path) -> None:
    """lightx2v's `.diff_b` beside a LoRA's factors: the module's bias difference, applied as ComfyUI
    and diffusers apply it, at strength alone (not times alpha / rank). kohya and ComfyUI outputs keep
    it as `diff_b`; diffusers and PEFT, which scale a LoRA's bias by alpha / r, refuse it by name."""
    tensors = distill_tensors("lora_bias")
    check_distill(tiny, tmp_path, tensors)
    path = tmp_path / "lora_bias.safetensors"
    save_file(tensors, str(path))
    for to in ("kohya", "comfyui"):
        out = tmp_path / f"lora_bias_{to}.safetensors"
        loratool.convert(path, to, out)
        assert any(k.endswith(".diff_b") for k in load_file(str(out)))
        merged = [tmp_path / f"m_{to}_{p.stem}.safetensors" for p in (path, out)]
        for lora, dest in zip((path, out), merged, strict=True):
            loratool.merge(tiny["single"], [lora], dest, device="cpu")
        first, second = load_file(str(merged[0])), load_file(str(merged[1]))
        assert all(torch.equal(first[k], second[k]) for k in first)
    lora_modules = {k.removesuffix(".lora_down.weight") for k in tensors if k.endswith(".lora_down.weight")}
    only = tmp_path / "lora_bias_only.safetensors"
    save_file(
        {
            k: v
            for k, v in tensors.items()
            if k.rsplit(".", 1)[0] in lora_modules or k.rsplit(".", 2)[0] in lora_modules
        },
        str(only),
    )
    with pytest.raises(ConversionError, match="diff_b is a bias difference"):
        loratool.convert(only, "diffusers", tmp_path / "refused.safetensors")
    assert not (tmp_path / "refused.safetensors").exists()


def test_distill_lora_with_a_lone_bias_diff_reads_and_merges(tiny, tmp_path) -> None:
    """A `.diff_b` alone (AccVideo's `time_projection.1`): a bias difference, as ComfyUI applies it."""
    check_distill(tiny, tmp_path, distill_tensors("lone_bias"))


# -- real widths ---------------------------------------------------------------------------------------------------
def _factors(key: str, shape: tuple[int, ...], layout: str) -> dict[str, torch.Tensor]:
    down, up = ("lora_A", "lora_B") if layout == "diffusers" else ("lora_down", "lora_up")
    kernel = shape[2:]
    return {
        f"{key}.{down}.weight": torch.zeros(4, shape[1], *kernel),
        f"{key}.{up}.weight": torch.zeros(shape[0], 4, *(1 for _ in kernel)),
    }


REAL = {
    "wan2.1-t2v-1.3b": ("diffusers", {"blocks.0.attn1.to_q": (1536, 1536), "blocks.0.ffn.net.0.proj": (8960, 1536)}),
    "wan2.2-ti2v-5b": ("diffusers", {"blocks.0.attn2.to_k": (3072, 3072), "blocks.29.ffn.net.2": (3072, 14336)}),
    "wan2.1-t2v-14b": ("comfyui", {"blocks.0.self_attn.q": (5120, 5120), "blocks.39.ffn.0": (13824, 5120)}),
    # an image cross-attention module: Wan 2.1 I2V (or FLF2V), whatever else the file has
    "wan2.1-i2v-14b": ("comfyui", {"blocks.0.cross_attn.k_img": (5120, 5120), "blocks.0.self_attn.q": (5120, 5120)}),
    # 36 input channels without k_img: Wan 2.2 I2V A14B
    "wan2.2-i2v-a14b": ("comfyui", {"patch_embedding": (5120, 36, 1, 2, 2), "blocks.0.self_attn.q": (5120, 5120)}),
    "wan2.1-vace-14b": ("comfyui", {"vace_blocks.7.after_proj": (5120, 5120), "blocks.0.self_attn.q": (5120, 5120)}),
    "wan2.1-vace-1.3b": ("diffusers", {"vace_blocks.0.proj_in": (1536, 1536), "blocks.0.attn1.to_q": (1536, 1536)}),
}


@pytest.mark.parametrize("variant", list(REAL))
def test_real_widths_pick_the_variant(tmp_path, variant: str) -> None:
    """Two modules at the published widths, zeros: the Wan variant they belong to, and no other family."""
    layout, shapes = REAL[variant]
    prefix = "transformer." if layout == "diffusers" else "diffusion_model."
    tensors = {}
    for name, shape in shapes.items():
        tensors |= _factors(prefix + name, shape, layout)
    path = tmp_path / f"{variant}.safetensors"
    save_file(tensors, str(path))
    report = loratool.inspect(path)
    assert report.architecture == variant
    assert not [f for f in report.findings if f.severity == "error"]


def test_musubi_kohya_names_at_real_widths_read_as_wan(tmp_path) -> None:
    """musubi-tuner's names and metadata on a 1.3B LoRA (its `lora_unet_blocks_0_self_attn_q`)."""
    tensors = {}
    for name, shape in {
        "lora_unet_blocks_0_self_attn_q": (1536, 1536),
        "lora_unet_blocks_29_ffn_2": (1536, 8960),
    }.items():
        tensors |= _factors(name, shape, "kohya")
        tensors[f"{name}.alpha"] = torch.tensor(4.0)
    path = tmp_path / "musubi.safetensors"
    save_file(tensors, str(path), metadata={"ss_base_model_version": "wan", "modelspec.architecture": "wan2.1/lora"})
    report = loratool.inspect(path)
    assert report.format == "kohya" and report.architecture == "wan2.1-t2v-1.3b"


def test_an_i2v_lora_on_a_t2v_base_names_the_image_attention_modules(tiny, tmp_path) -> None:
    """Wan 2.1 I2V's image cross-attention (k_img, v_img) has nowhere to go in a T2V model: against a
    T2V base, inspect names exactly those modules, and merge refuses them unless --allow-unmatched,
    which merges the rest."""
    torch.manual_seed(1)
    t2v = WanTransformer3DModel(**{k: v for k, v in TINY.items() if k not in ("image_dim", "added_kv_proj_dim")})
    base = tmp_path / "t2v.safetensors"
    save_file(base_checkpoint(get_architecture("wan2.1-t2v-14b"), {"transformer": t2v}), str(base))
    report = loratool.inspect(tiny["lora"], base=base)
    image = {m for m in tiny["targets"] if ".add_k_proj" in m or ".add_v_proj" in m or "image_embedder" in m}
    errors = [f for f in report.findings if f.severity == "error"]
    assert {f.module.removeprefix("transformer.") for f in errors if f.module} == image, errors
    assert not [f for f in errors if f.code == "base-mismatch"], errors
    (partial,) = [f for f in report.findings if f.code == "base-partial"]
    assert f"{len(image)} of its {len(tiny['targets'])} modules have nowhere to go" in partial.message
    with pytest.raises(MergeError, match=r"add_k_proj|k_img"):
        loratool.merge(base, [tiny["lora"]], tmp_path / "refused.safetensors", device="cpu")
    merged = loratool.merge(base, [tiny["lora"]], tmp_path / "merged.safetensors", device="cpu", allow_unmatched=True)
    assert len(merged.loras[0].unmatched) == len(image)
