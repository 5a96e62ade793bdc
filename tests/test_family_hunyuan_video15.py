"""HunyuanVideo 1.5 (issue 22), against diffusers wherever diffusers has something to say.

The pinned diffusers has the model (`HunyuanVideo15Transformer3DModel`) but neither a single-file
converter nor a LoRA loader or converter for it. The original (Tencent) names are checked against the
mapping of diffusers' conversion script (`scripts/convert_hunyuan_video1_5_to_diffusers.py`,
`convert_hyvideo15_transformer_to_diffusers`, in the diffusers repository, not the package), written
down here as data (`SCRIPT_*`): original names -> diffusers names, the refiner's `self_attn_qkv` split
in three, the final modulation's halves swapped.

- Table: every original name, through that mapping at full size, gives back exactly the diffusers
  model's keys with the right rows.
- A LoRA saved by diffusers (`HunyuanVideoLoraLoaderMixin.save_lora_weights`: diffusers has no 1.5
  loader; saving only prefixes `transformer.`) on a tiny 1.5 transformer is read as HunyuanVideo 1.5;
  our kohya and ComfyUI outputs, renamed by the script's mapping, give back its updates; merged into the
  diffusers folder it equals `load_lora_adapter` + `fuse_lora`; merged into the original single file it
  equals that after the script's mapping.
- OneTrainer and SimpleTuner LyCORIS renamings read as the same LoRA; real widths read as 1.5 only.
"""

from __future__ import annotations

import re

import pytest
import torch
from dit_oracle import assert_folder_merge_is_fuse, assert_single_file_merge_is_fuse, tiny_dit
from safetensors.torch import load_file, save_file
from test_archs import _rows_marker
from test_merge_diffusers import base_checkpoint

import loratool
from loratool.archs import detect, get_architecture

diffusers = pytest.importorskip("diffusers")
from diffusers import HunyuanVideo15Transformer3DModel  # noqa: E402
from diffusers.loaders.lora_pipeline import HunyuanVideoLoraLoaderMixin  # noqa: E402

ARCH = "hunyuan_video15"
TINY = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=8,
    num_layers=2,
    num_refiner_layers=1,
    # released: 1x1x1; PEFT's fuse takes a (1, 1, 1) Conv3d kernel for a 1x1 Conv2d and fails
    patch_size=2,
    patch_size_t=1,
    text_embed_dim=8,
    text_embed_2_dim=8,
    image_embed_dim=8,
    rope_axes_dim=(2, 2, 4),
)
DOUBLE = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_out.0",
    "attn.to_add_out",
    "norm1.linear",
    "norm1_context.linear",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
]
REFINER = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.0.proj", "norm_out.linear"]
TOP = [
    "x_embedder.proj",
    "image_embedder.linear_1",
    "image_embedder.linear_2",
    "context_embedder.proj_in",
    "context_embedder.time_text_embed.text_embedder.linear_1",
    "context_embedder_2.linear_1",
    "context_embedder_2.linear_3",
    "time_embed.timestep_embedder.linear_1",
    "proj_out",
    "norm_out.linear",
]

# diffusers' conversion script, as data: original module -> diffusers module.
SCRIPT_TOP = {
    "time_in.mlp.0": "time_embed.timestep_embedder.linear_1",
    "time_in.mlp.2": "time_embed.timestep_embedder.linear_2",
    "txt_in.t_embedder.mlp.0": "context_embedder.time_text_embed.timestep_embedder.linear_1",
    "txt_in.t_embedder.mlp.2": "context_embedder.time_text_embed.timestep_embedder.linear_2",
    "txt_in.c_embedder.linear_1": "context_embedder.time_text_embed.text_embedder.linear_1",
    "txt_in.c_embedder.linear_2": "context_embedder.time_text_embed.text_embedder.linear_2",
    "txt_in.input_embedder": "context_embedder.proj_in",
    "byt5_in.layernorm": "context_embedder_2.norm",
    "byt5_in.fc1": "context_embedder_2.linear_1",
    "byt5_in.fc2": "context_embedder_2.linear_2",
    "byt5_in.fc3": "context_embedder_2.linear_3",
    "vision_in.proj.0": "image_embedder.norm_in",
    "vision_in.proj.1": "image_embedder.linear_1",
    "vision_in.proj.3": "image_embedder.linear_2",
    "vision_in.proj.4": "image_embedder.norm_out",
    "img_in.proj": "x_embedder.proj",
    "cond_type_embedding": "cond_type_embed",
    "final_layer.adaLN_modulation.1": "norm_out.linear",  # (shift, scale) -> (scale, shift)
    "final_layer.linear": "proj_out",
}
SCRIPT_REFINER = {  # txt_in.individual_token_refiner.blocks.N -> context_embedder.token_refiner.refiner_blocks.N
    "norm1": "norm1",
    "self_attn_proj": "attn.to_out.0",
    "norm2": "norm2",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
    "adaLN_modulation.1": "norm_out.linear",
}
SCRIPT_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")  # a refiner's self_attn_qkv, chunked in three
SCRIPT_DOUBLE = {  # double_blocks.N -> transformer_blocks.N
    "img_mod.linear": "norm1.linear",
    "txt_mod.linear": "norm1_context.linear",
    "img_attn_q": "attn.to_q",
    "img_attn_k": "attn.to_k",
    "img_attn_v": "attn.to_v",
    "img_attn_q_norm": "attn.norm_q",
    "img_attn_k_norm": "attn.norm_k",
    "img_attn_proj": "attn.to_out.0",
    "txt_attn_q": "attn.add_q_proj",
    "txt_attn_k": "attn.add_k_proj",
    "txt_attn_v": "attn.add_v_proj",
    "txt_attn_q_norm": "attn.norm_added_q",
    "txt_attn_k_norm": "attn.norm_added_k",
    "txt_attn_proj": "attn.to_add_out",
    "img_mlp.fc1": "ff.net.0.proj",
    "img_mlp.fc2": "ff.net.2",
    "txt_mlp.fc1": "ff_context.net.0.proj",
    "txt_mlp.fc2": "ff_context.net.2",
}


def script_modules(original: str) -> tuple[str, ...]:
    """The diffusers module(s) the script makes of an original module (three for `self_attn_qkv`)."""
    if original in SCRIPT_TOP:
        return (SCRIPT_TOP[original],)
    m = re.fullmatch(r"txt_in\.individual_token_refiner\.blocks\.(\d+)\.(.+)", original)
    if m:
        block = f"context_embedder.token_refiner.refiner_blocks.{m.group(1)}"
        if m.group(2) == "self_attn_qkv":
            return tuple(f"{block}.{part}" for part in SCRIPT_QKV)
        return (f"{block}.{SCRIPT_REFINER[m.group(2)]}",)
    m = re.fullmatch(r"double_blocks\.(\d+)\.(.+)", original)
    assert m, original
    return (f"transformer_blocks.{m.group(1)}.{SCRIPT_DOUBLE[m.group(2)]}",)


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    half = t.shape[0] // 2
    return torch.cat([t[half:], t[:half]])


def script_convert(checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The script's conversion of an original checkpoint (weights and biases)."""
    out = {}
    for key, value in checkpoint.items():
        module, _, param = key.rpartition(".")
        targets = script_modules(module)
        if module == "final_layer.adaLN_modulation.1":
            value = swap_halves(value)
        for target, piece in zip(targets, value.chunk(len(targets)), strict=True):
            out[f"{target}.{param}"] = piece
    return out


def test_original_names_fused_rows_and_swaps_match_diffusers_conversion_script() -> None:
    from loratool.archs.families import hunyuan_video15

    arch = get_architecture(ARCH)
    checkpoint, expected = {}, {}
    specs = [s for s in arch.modules.values() if s.component == "transformer"]
    for marker, spec in enumerate(specs, 1):
        if spec.fused is not None:
            continue
        weight = _rows_marker(marker, spec.shape[0])
        if spec.type == "norm":
            weight = weight[:, 0]
        checkpoint[spec.native_weight] = weight
        expected[spec.path + ".weight"] = swap_halves(weight) if spec.rows else weight
    for marker, group in enumerate((g for g in arch.fused.values() if g.component == "transformer"), 10_000):
        parts = [arch.modules[p] for p in group.parts]
        fused = _rows_marker(marker, sum(p.shape[0] for p in parts))
        checkpoint[group.weight] = fused
        start = 0
        for spec in parts:
            expected[spec.path + ".weight"] = fused[start : start + spec.shape[0]]
            start += spec.shape[0]
    assert {s.path for s in specs if s.rows == "swap_halves"} == {"norm_out.linear"}
    assert {g.native for g in arch.fused.values()} == {
        f"txt_in.individual_token_refiner.blocks.{i}.self_attn_qkv" for i in range(2)
    }
    config = hunyuan_video15.HUNYUAN_VIDEO15
    norms = [s for s in specs if s.type == "norm"]
    # dual-stream blocks: q/k RMSNorms of two streams; refiner: norm1, norm2; image projection: two
    # LayerNorms; ByT5 projection: one
    assert len(norms) == 4 * config["num_layers"] + 2 * config["num_refiner_layers"] + 2 + 1

    converted = script_convert(checkpoint)
    assert set(converted) == set(expected)
    assert not [k for k, v in expected.items() if not torch.equal(converted[k], v)]
    with torch.device("meta"):
        model = HunyuanVideo15Transformer3DModel(**config)
    state = model.state_dict()
    assert set(converted) == {k for k in state if k.endswith(".weight")}
    assert not [k for k, v in converted.items() if state[k].shape[0] != v.shape[0]]
    assert arch.modules["transformer.x_embedder.proj"].shape == (2048, 65, 1, 1, 1)


# -- a LoRA diffusers saved, on a tiny HunyuanVideo 1.5 transformer ------------------------------------------------
def peft_targets(model: torch.nn.Module, names: list[str]) -> list[str]:
    """Every module PEFT adapts for `names` (it also takes a name as a suffix)."""
    return [n for n, _ in model.named_modules() if any(n == t or n.endswith("." + t) for t in names)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hunyuan_video15")
    torch.manual_seed(0)
    model = HunyuanVideo15Transformer3DModel(**TINY)
    checkpoint = base_checkpoint(get_architecture(ARCH), {"transformer": model})
    converted = script_convert(checkpoint)  # the base is the model, in the script's reading
    assert set(converted) == set(model.state_dict())
    assert not [k for k, v in model.state_dict().items() if not torch.equal(converted[k], v)]
    single = root / "hunyuan_video15_tiny.safetensors"
    save_file(checkpoint, str(single))
    names = [f"transformer_blocks.{i}.{t}" for i in range(TINY["num_layers"]) for t in DOUBLE]
    names += [f"context_embedder.token_refiner.refiner_blocks.0.{t}" for t in REFINER] + TOP
    targets = peft_targets(model, names)
    # diffusers has no HunyuanVideo 1.5 LoRA loader; HunyuanVideo's saves the same `transformer.` layout
    dit = tiny_dit(root, model, "HunyuanVideo15Pipeline", HunyuanVideoLoraLoaderMixin, targets)
    return dict(folder=dit.folder, single=single, lora=dit.lora, before=dit.before, fused=dit.fused, targets=targets)


def test_diffusers_lora_is_read_as_hunyuan_video15(tiny) -> None:
    report = loratool.inspect(tiny["lora"])
    assert report.format == "diffusers" and report.architecture == ARCH
    assert {m.name.removeprefix("transformer.") for m in report.modules} == set(tiny["targets"])
    assert not [f for f in report.findings if f.severity == "error"]


def script_updates(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """module -> scaled update of a kohya-tensor file with original names (`lora_unet_` or
    `diffusion_model.`), renamed by the script's mapping: a fused `self_attn_qkv` update splits into
    q, k, v rows, the final modulation's rows are swapped back."""
    originals = set()
    for key in tensors:
        stem = key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0]
        originals.add(stem)
    out = {}
    for stem in originals:
        down, up = tensors[stem + ".lora_down.weight"].double(), tensors[stem + ".lora_up.weight"].double()
        alpha = tensors.get(stem + ".alpha")
        scale = 1.0 if alpha is None else alpha.item() / down.shape[0]
        update = (up.flatten(1) @ down.flatten(1)) * scale
        module = stem.removeprefix("diffusion_model.")
        if stem.startswith("lora_unet_"):  # kohya: dots became underscores; the script's names tell them back
            flat = module.removeprefix("lora_unet_")
            module = next(m for m in ORIGINAL_MODULES if m.replace(".", "_") == flat)
        if module == "final_layer.adaLN_modulation.1":
            update = swap_halves(update)
        targets = script_modules(module)
        for target, piece in zip(targets, update.chunk(len(targets)), strict=True):
            out[target] = piece
    return out


ORIGINAL_MODULES = sorted(
    {s.native for s in get_architecture(ARCH).modules.values() if s.native}
    | {g.native for g in get_architecture(ARCH).fused.values()}
)


def test_kohya_and_comfyui_outputs_are_our_diffusers_file_by_the_script_names(tiny, tmp_path) -> None:
    from deltas import deltas

    ours = {k.removeprefix("transformer."): v.double() for k, v in deltas(tiny["lora"]).items()}
    for to, first in (
        ("kohya", "lora_unet_double_blocks_0_img_attn_q.lora_down.weight"),
        ("comfyui", "diffusion_model.txt_in.individual_token_refiner.blocks.0.self_attn_qkv.lora_down.weight"),
    ):
        out = tmp_path / f"{to}.safetensors"
        loratool.convert(tiny["lora"], to, out)
        tensors = load_file(str(out))
        assert first in tensors, sorted(tensors)[:6]
        assert loratool.inspect(out).architecture == ARCH
        theirs = script_updates(tensors)
        assert set(theirs) == set(ours)
        for module, value in ours.items():
            torch.testing.assert_close(
                theirs[module].reshape(value.shape), value, rtol=1e-5, atol=1e-7, msg=lambda m, k=module: f"{k}: {m}"
            )
        back = tmp_path / f"{to}_back.safetensors"
        loratool.convert(out, "diffusers", back)
        got = deltas(back)
        assert {k.removeprefix("transformer.") for k in got} == set(ours)
        for module, value in ours.items():
            torch.testing.assert_close(got["transformer." + module].double(), value, rtol=1e-5, atol=1e-6)


def test_merge_into_the_diffusers_folder_equals_fuse_lora(tiny, tmp_path) -> None:
    assert_folder_merge_is_fuse(
        tiny["folder"], tiny["lora"], tiny["before"], tiny["fused"], tiny["targets"], tmp_path / "merged"
    )


def test_merge_into_the_original_single_file_equals_fuse_lora_after_the_script_mapping(tiny, tmp_path) -> None:
    assert_single_file_merge_is_fuse(tiny["single"], tiny["lora"], tiny["fused"], script_convert, tmp_path)


@pytest.mark.parametrize("prefix", ["lora_transformer_", "lycoris_"])
def test_onetrainer_and_simpletuner_names_read_as_the_same_lora(tiny, tmp_path, prefix: str) -> None:
    """OneTrainer (`lora_transformer_`) and SimpleTuner's LyCORIS (`lycoris_`): the diffusers path with
    underscores, kohya tensor names."""
    from deltas import deltas

    tensors = {}
    scales = {m.name.removeprefix("transformer."): m.scale for m in loratool.inspect(tiny["lora"]).modules}
    for key, value in load_file(str(tiny["lora"])).items():
        module, _, factor = key.removeprefix("transformer.").rpartition(".lora_")
        name = prefix + module.replace(".", "_")
        side = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}[factor]
        tensors[f"{name}.{side}"] = value
        if factor == "A.weight":
            tensors[f"{name}.alpha"] = torch.tensor(scales[module] * value.shape[0])
    path = tmp_path / "renamed.safetensors"
    save_file(tensors, str(path))
    assert loratool.inspect(path).architecture == ARCH
    want, got = deltas(tiny["lora"]), deltas(path)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7)


def test_real_widths_are_read_as_hunyuan_video15_only(tmp_path) -> None:
    """Width 2048 (16 heads of 128) and 54 blocks: HunyuanVideo 1.5's, and no other family's."""
    shapes = {"transformer_blocks.0.attn.to_q": (2048, 2048), "transformer_blocks.53.ff.net.0.proj": (8192, 2048)}
    tensors = {}
    for module, (rows, cols) in shapes.items():
        tensors[f"transformer.{module}.lora_A.weight"] = torch.zeros(4, cols)
        tensors[f"transformer.{module}.lora_B.weight"] = torch.zeros(rows, 4)
    path = tmp_path / "real.safetensors"
    save_file(tensors, str(path))
    report = loratool.inspect(path)
    assert report.architecture == ARCH, report.architecture_reason
    assert not [f for f in report.findings if f.severity == "error"]
    arch = get_architecture(ARCH)
    assert {m: tuple(arch.modules["transformer." + m].shape) for m in shapes} == shapes
    implied = {f"transformer.{m}": s for m, s in shapes.items()}
    found = detect(list(implied), "diffusers", {}, implied_shape=implied.get)
    assert found.arch.name == ARCH and not found.tied
    kohya = tmp_path / "kohya.safetensors"  # musubi-tuner's names are 1.5's own (q, k, v apart)
    save_file(
        {
            "lora_unet_double_blocks_0_img_attn_q.lora_down.weight": torch.zeros(4, 2048),
            "lora_unet_double_blocks_0_img_attn_q.lora_up.weight": torch.zeros(2048, 4),
            "lora_unet_double_blocks_0_img_attn_q.alpha": torch.tensor(4.0),
        },
        str(kohya),
        metadata={"ss_base_model_version": "hunyuan_video_1_5", "modelspec.architecture": "hunyuan-video-1.5/lora"},
    )
    report = loratool.inspect(kohya)
    assert report.architecture == ARCH, report.architecture_reason
    assert not [f for f in report.findings if f.severity in ("error", "warning") and "metadata" in f.code]
