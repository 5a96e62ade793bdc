"""HunyuanVideo (issue 22), against diffusers at every step.

- Table: the original (Tencent) names, fed through diffusers' own
  `convert_hunyuan_video_transformer_to_diffusers` at full size, give back exactly the diffusers
  model's keys, with the fused `img_attn_qkv` / `txt_attn_qkv` / refiner `self_attn_qkv` / `linear1`
  rows and the swapped final modulation halves where they belong.
- A LoRA saved by diffusers itself (`HunyuanVideoLoraLoaderMixin.save_lora_weights`) on a tiny
  HunyuanVideo transformer (real module names, narrow widths, the Conv3d patch embedding and the token
  refiner included) is read as HunyuanVideo. Our kohya (musubi-tuner's `lora_unet_` names) and ComfyUI
  (`diffusion_model.`, diffusion-pipe's layout) outputs, fed through diffusers' HunyuanVideo LoRA
  converter, give back our diffusers output's update tensor for tensor; merged into the model's
  diffusers folder it equals `load_lora_adapter` + `fuse_lora`; merged into the original single file it
  equals that after diffusers' single-file converter.
- OneTrainer and SimpleTuner LyCORIS renamings read as the same LoRA; Tencent names under
  `transformer.` (ComfyUI maps them) read as the ComfyUI file (needs a library change, see that test).
- Real widths: HunyuanVideo's blocks are Flux.1-dev's, module for module and shape for shape: what
  detection does with each kind of HunyuanVideo LoRA, and with a Flux.1 one.
"""

from __future__ import annotations

import pytest
import torch
from dit_oracle import assert_folder_merge_is_fuse, assert_single_file_merge_is_fuse, tiny_dit
from safetensors.torch import load_file, save_file
from test_archs import _rows_marker
from test_merge_diffusers import base_checkpoint

import loratool
from loratool.archs import detect, get_architecture

diffusers = pytest.importorskip("diffusers")
from diffusers import HunyuanVideoTransformer3DModel  # noqa: E402
from diffusers.loaders.lora_conversion_utils import _convert_hunyuan_video_lora_to_diffusers  # noqa: E402
from diffusers.loaders.lora_pipeline import HunyuanVideoLoraLoaderMixin  # noqa: E402
from diffusers.loaders.single_file_utils import convert_hunyuan_video_transformer_to_diffusers  # noqa: E402

ARCH = "hunyuan_video"
TINY = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=8,
    num_layers=2,
    num_single_layers=2,
    num_refiner_layers=1,
    patch_size=2,  # PEFT's fuse takes a (1, 1, 1) Conv3d kernel for a 1x1 Conv2d and fails: (1, 2, 2) as released
    patch_size_t=1,
    text_embed_dim=8,
    pooled_projection_dim=8,
    rope_axes_dim=(2, 2, 4),
)
DOUBLE = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.add_q_proj",  # the text qkv in part: k left out
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
SINGLE = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear"]
REFINER = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.0.proj", "ff.net.2", "norm_out.linear"]
TOP = [
    "x_embedder.proj",  # a Conv3d
    "context_embedder.proj_in",
    "context_embedder.time_text_embed.timestep_embedder.linear_1",
    "context_embedder.time_text_embed.text_embedder.linear_2",
    "time_text_embed.timestep_embedder.linear_2",
    "time_text_embed.text_embedder.linear_1",
    "time_text_embed.guidance_embedder.linear_2",
    "proj_out",
    "norm_out.linear",
]


def get_config() -> dict:
    from loratool.archs.families import hunyuan_video

    return dict(hunyuan_video.HUNYUAN_VIDEO)


def test_original_names_fused_rows_and_swaps_match_diffusers_converter() -> None:
    arch = get_architecture(ARCH)
    checkpoint, expected = {}, {}
    specs = [s for s in arch.modules.values() if s.component == "transformer"]
    for marker, spec in enumerate(specs, 1):
        if spec.fused is not None:
            continue
        rows = spec.shape[0]
        weight = _rows_marker(marker, rows)
        if spec.type == "norm":
            checkpoint[spec.native_weight] = expected[spec.path + ".weight"] = weight[:, 0]
            continue
        checkpoint[spec.native_weight] = weight
        checkpoint[spec.native + ".bias"] = weight[:, 0].clone()
        half = rows // 2
        expected[spec.path + ".weight"] = torch.cat([weight[half:], weight[:half]]) if spec.rows else weight
    for marker, group in enumerate((g for g in arch.fused.values() if g.component == "transformer"), 10_000):
        parts = [arch.modules[p] for p in group.parts]
        fused = _rows_marker(marker, sum(p.shape[0] for p in parts))
        checkpoint[group.weight] = fused
        checkpoint[group.weight.removesuffix("weight") + "bias"] = fused[:, 0].clone()
        start = 0
        for spec in parts:
            expected[spec.path + ".weight"] = fused[start : start + spec.shape[0]]
            start += spec.shape[0]
    assert {s.path for s in specs if s.rows == "swap_halves"} == {"norm_out.linear"}
    assert {g.native.rsplit(".", 1)[1] for g in arch.fused.values()} == {
        "self_attn_qkv",
        "img_attn_qkv",
        "txt_attn_qkv",
        "linear1",
    }
    config = get_config()
    norms = [s for s in specs if s.type == "norm"]
    # refiner blocks: norm1, norm2; dual-stream blocks: q/k RMSNorms of two streams; single: q/k RMSNorms
    assert len(norms) == 2 * config["num_refiner_layers"] + 4 * config["num_layers"] + 2 * config["num_single_layers"]

    converted = convert_hunyuan_video_transformer_to_diffusers(dict(checkpoint))
    weights = {k: v for k, v in converted.items() if k.endswith(".weight")}
    assert set(weights) == set(expected)
    assert not [k for k, v in expected.items() if not torch.equal(weights[k], v)]
    with torch.device("meta"):
        model = HunyuanVideoTransformer3DModel(**config)
    state = model.state_dict()
    assert set(weights) == {k for k in state if k.endswith(".weight")}
    assert not [k for k, v in expected.items() if state[k].shape[0] != v.shape[0]]
    assert arch.modules["transformer.x_embedder.proj"].shape == (3072, 16, 1, 2, 2)


# -- a LoRA diffusers saved, on a tiny HunyuanVideo transformer ----------------------------------------------------
def peft_targets(model: torch.nn.Module, names: list[str]) -> list[str]:
    """Every module PEFT adapts for `names` (it also takes a name as a suffix: `proj_out` is each
    single block's `proj_out` too), so the list is exactly what the LoRA holds."""
    return [n for n, _ in model.named_modules() if any(n == t or n.endswith("." + t) for t in names)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """The tiny model as a diffusers folder and as an original single file; a diffusers-saved LoRA; and
    diffusers' fused weights with it."""
    root = tmp_path_factory.mktemp("hunyuan_video")
    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(**TINY)
    checkpoint = base_checkpoint(get_architecture(ARCH), {"transformer": model})
    converted = convert_components(dict(checkpoint))  # the base is the model, in diffusers' reading
    assert set(converted) == set(model.state_dict())
    assert not [k for k, v in model.state_dict().items() if not torch.equal(converted[k], v)]
    single = root / "hunyuan_video_tiny.safetensors"
    save_file(checkpoint, str(single))
    names = [f"transformer_blocks.{i}.{t}" for i in range(TINY["num_layers"]) for t in DOUBLE]
    names += [f"single_transformer_blocks.{i}.{t}" for i in range(TINY["num_single_layers"]) for t in SINGLE]
    names += [f"context_embedder.token_refiner.refiner_blocks.0.{t}" for t in REFINER] + TOP
    targets = peft_targets(model, names)
    dit = tiny_dit(root, model, "HunyuanVideoPipeline", HunyuanVideoLoraLoaderMixin, targets)
    return dict(
        folder=dit.folder,
        single=single,
        base=checkpoint,
        lora=dit.lora,
        before=dit.before,
        fused=dit.fused,
        targets=targets,
    )


def test_diffusers_lora_is_read_as_hunyuan_video(tiny) -> None:
    report = loratool.inspect(tiny["lora"])
    assert report.format == "diffusers" and report.architecture == ARCH
    assert {m.name.removeprefix("transformer.") for m in report.modules} == set(tiny["targets"])
    assert not [f for f in report.findings if f.severity == "error"]


def updates(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """module -> B @ A of a diffusers-named LoRA state dict (`transformer.` keys)."""
    out = {}
    for key, down in state.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            up = state[module + ".lora_B.weight"].double().flatten(1)
            out[module.removeprefix("transformer.")] = up @ down.double().flatten(1)
    return out


def for_diffusers(tensors: dict[str, torch.Tensor], base_keys: set[str]) -> dict[str, torch.Tensor]:
    """What diffusers' HunyuanVideo LoRA converter can read, from our kohya or ComfyUI file.

    Quirks of `_convert_hunyuan_video_lora_to_diffusers` worked around here:
    (1) it reads Tencent names under `diffusion_model.` or `transformer.` with PEFT tensor names
        (diffusion-pipe's layout): kohya's `lora_unet_` names are mapped here the way ComfyUI does, from
        the base model's own keys with dots as underscores, `lora_down`/`lora_up` become `lora_A`/`lora_B`,
        and `.alpha` (which it does not read) is folded into `lora_A` as alpha / rank;
    (2) it splits a refiner's `self_attn_qkv` into q, k, v with `chunk(3)` on `lora_A` as well as
        `lora_B` (its `img_attn_qkv` / `txt_attn_qkv` rules copy `lora_A` to each part): `lora_A` is given
        three times over, so each part gets it whole;
    (3) it swaps the halves of `final_layer.adaLN_modulation.1`'s `lora_A` as well as its `lora_B`
        (only rows of the update are swapped in the file): `lora_A` is given pre-swapped, so it comes back
        as it was."""
    flat = {"lora_unet_" + k.removesuffix(".weight").replace(".", "_"): k.removesuffix(".weight") for k in base_keys}
    out = {}
    for key, value in tensors.items():
        if key.endswith(".alpha"):
            continue
        stem, side = key.rsplit(".lora_", 1)
        name = "diffusion_model." + flat[stem] if stem.startswith("lora_unet_") else stem
        if side == "down.weight":
            alpha = tensors.get(stem + ".alpha")
            down = value * (1.0 if alpha is None else alpha.item() / value.shape[0])
            if name.endswith(".self_attn_qkv"):
                down = torch.cat([down, down, down])
            if name.endswith("final_layer.adaLN_modulation.1"):
                half = down.shape[0] // 2
                down = torch.cat([down[half:], down[:half]])
            out[name + ".lora_A.weight"] = down
        else:
            assert side == "up.weight", key
            out[name + ".lora_B.weight"] = value
    return out


def split_linear1(converter, tensors: dict[str, torch.Tensor], inner: int) -> dict[str, torch.Tensor]:
    """Run `converter` with each single block's `linear1` rows (a weight, bias or `lora_B`) given as an
    empty stand-in of full-size height: diffusers splits them at (3072, 3072, 3072, rest) whatever the
    tensor holds. The four parts it names are then filled with the tensor split at the tiny widths."""
    widths = (inner, inner, inner, 4 * inner)
    linear1 = {k: v for k, v in tensors.items() if ".linear1." in k and ".lora_A." not in k}
    stand_in = {k: torch.empty(7 * 3072, *([0] if v.dim() > 1 else [])) for k, v in linear1.items()}
    out = converter({**tensors, **stand_in})
    for key, value in linear1.items():
        head, _, tail = key.partition(".linear1.")
        block = head.replace("single_blocks", "single_transformer_blocks")
        block = block.removeprefix("diffusion_model.").removeprefix("transformer.")
        if converter is _convert_hunyuan_video_lora_to_diffusers:
            block = "transformer." + block
        parts = [f"{block}.attn.to_q", f"{block}.attn.to_k", f"{block}.attn.to_v", f"{block}.proj_mlp"]
        pieces = torch.split(value, widths)
        for part, piece in zip(parts, pieces, strict=True):
            assert f"{part}.{tail}" in out, (part, tail)
            out[f"{part}.{tail}"] = piece
    return out


def convert_components(checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' single-file converter on a tiny checkpoint (see `split_linear1`)."""
    inner = TINY["num_attention_heads"] * TINY["attention_head_dim"]
    return split_linear1(convert_hunyuan_video_transformer_to_diffusers, checkpoint, inner)


def test_kohya_and_comfyui_outputs_through_diffusers_converter_are_our_diffusers_file(tiny, tmp_path) -> None:
    from deltas import deltas

    ours = {k.removeprefix("transformer."): v.double() for k, v in deltas(tiny["lora"]).items()}
    inner = TINY["num_attention_heads"] * TINY["attention_head_dim"]
    for to, first in (
        ("kohya", "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"),
        ("comfyui", "diffusion_model.txt_in.individual_token_refiner.blocks.0.self_attn_qkv.lora_down.weight"),
    ):
        out = tmp_path / f"{to}.safetensors"
        loratool.convert(tiny["lora"], to, out)
        tensors = load_file(str(out))
        assert first in tensors, sorted(tensors)[:6]
        assert loratool.inspect(out).architecture == ARCH
        readable = for_diffusers(tensors, set(tiny["base"]))
        theirs = updates(split_linear1(_convert_hunyuan_video_lora_to_diffusers, readable, inner))
        # a fused qkv splits into all three parts: those the LoRA left out come back as zero updates
        assert set(ours) <= set(theirs) and not [k for k in set(theirs) - set(ours) if theirs[k].any()]
        for module, value in ours.items():
            torch.testing.assert_close(
                theirs[module].reshape(value.shape), value, rtol=1e-5, atol=1e-7, msg=lambda m, k=module: f"{k}: {m}"
            )
        back = tmp_path / f"{to}_back.safetensors"
        loratool.convert(out, "diffusers", back)
        got = deltas(back)
        for module, value in ours.items():
            torch.testing.assert_close(got["transformer." + module].double(), value, rtol=1e-5, atol=1e-6)


def test_merge_into_the_diffusers_folder_equals_fuse_lora(tiny, tmp_path) -> None:
    assert_folder_merge_is_fuse(
        tiny["folder"], tiny["lora"], tiny["before"], tiny["fused"], tiny["targets"], tmp_path / "merged"
    )


def test_merge_into_the_original_single_file_equals_fuse_lora_after_diffusers_converter(tiny, tmp_path) -> None:
    assert_single_file_merge_is_fuse(tiny["single"], tiny["lora"], tiny["fused"], convert_components, tmp_path)


@pytest.mark.parametrize("prefix", ["lora_transformer_", "lycoris_"])
def test_onetrainer_and_simpletuner_names_read_as_the_same_lora(tiny, tmp_path, prefix: str) -> None:
    """OneTrainer (`lora_transformer_`) and SimpleTuner's LyCORIS (`lycoris_`): the diffusers path with
    underscores, kohya tensor names."""
    from deltas import deltas

    diffusers_named = tmp_path / "kohya_diffusers_paths.safetensors"
    tensors = {}
    for key, value in load_file(str(tiny["lora"])).items():
        module, _, factor = key.removeprefix("transformer.").rpartition(".lora_")
        side = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}[factor]
        tensors[f"{prefix}{module.replace('.', '_')}.{side}"] = value
    scales = {m.name.removeprefix("transformer."): m.scale for m in loratool.inspect(tiny["lora"]).modules}
    for module, scale in scales.items():
        rank = tensors[f"{prefix}{module.replace('.', '_')}.lora_down.weight"].shape[0]
        tensors[f"{prefix}{module.replace('.', '_')}.alpha"] = torch.tensor(scale * rank)
    save_file(tensors, str(diffusers_named))
    assert loratool.inspect(diffusers_named).architecture == ARCH
    want, got = deltas(tiny["lora"]), deltas(diffusers_named)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7)


def test_tencent_names_under_transformer_read_as_the_comfyui_file(tiny, tmp_path) -> None:
    """`transformer.` + Tencent names with PEFT tensors: what ComfyUI also maps for HunyuanVideo and
    diffusers' converter accepts ("folks attempt to make their state dict compatible").

    NEEDS A LIBRARY CHANGE (fails until then): the diffusers codec claims every `transformer.` key as
    well as the native one, wins the tie by codec order and reads these names as diffusers paths
    (`final_layer.linear` is a HiDream path). Proposed: `DiffusersCodec.claim` leaves to the native
    codec the keys whose module is a native name of some table and no table's diffusers path."""
    from deltas import deltas

    comfy = tmp_path / "comfyui.safetensors"
    loratool.convert(tiny["lora"], "comfyui", comfy)
    readable = for_diffusers(load_file(str(comfy)), set(tiny["base"]))
    # undo the workarounds for diffusers' converter: plain PEFT tensors again
    plain = {}
    for key, value in readable.items():
        if key.endswith(".self_attn_qkv.lora_A.weight"):
            value = value[: value.shape[0] // 3]
        if "final_layer.adaLN_modulation.1.lora_A" in key:
            half = value.shape[0] // 2
            value = torch.cat([value[half:], value[:half]])
        plain["transformer." + key.removeprefix("diffusion_model.")] = value
    path = tmp_path / "transformer_tencent.safetensors"
    save_file(plain, str(path))
    report = loratool.inspect(path)
    assert report.architecture == ARCH, report.architecture_reason
    assert not [f for f in report.findings if f.severity == "error"]
    want, got = deltas(tiny["lora"]), deltas(path)
    assert set(want) <= set(got) and not [k for k in set(got) - set(want) if got[k].any()]
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)


# -- real widths: HunyuanVideo's blocks are Flux.1-dev's ---------------------------------------------------------
def _lora(path, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str] | None = None) -> None:
    tensors = {}
    for module, shape in shapes.items():
        rows, cols = shape[0], shape[1:]
        tensors[f"transformer.{module}.lora_A.weight"] = torch.zeros(4, *cols)
        tensors[f"transformer.{module}.lora_B.weight"] = torch.zeros(rows, 4, *([1] * (len(cols) - 1)))
    save_file(tensors, str(path), metadata=metadata)


def test_real_widths_only_hunyuan_video_names_are_read_as_hunyuan_video(tmp_path) -> None:
    """The token refiner and a block past Flux.1's 19 are HunyuanVideo's (and 1.5's, at its width)."""
    shapes = {
        "context_embedder.token_refiner.refiner_blocks.1.attn.to_q": (3072, 3072),
        "transformer_blocks.19.attn.to_q": (3072, 3072),
    }
    path = tmp_path / "own.safetensors"
    _lora(path, shapes)
    report = loratool.inspect(path)
    assert report.architecture == ARCH
    assert not [f for f in report.findings if f.severity == "error"]
    arch = get_architecture(ARCH)
    assert {m: tuple(arch.modules["transformer." + m].shape) for m in shapes} == shapes
    implied = {f"transformer.{m}": s for m, s in shapes.items()}
    found = detect(list(implied), "diffusers", {}, implied_shape=implied.get)
    assert found.arch.name == ARCH and not found.tied
    # HunyuanVideo 1.5 has these names too (a refiner, 54 blocks), at width 2048
    assert [name for name, count in found.scores if count == 2] == [ARCH, "hunyuan_video15"]


def test_real_widths_blocks_flux1_also_has_tie_and_metadata_settles_them(tmp_path) -> None:
    """Blocks 0-18 / 0-37 of HunyuanVideo and Flux.1-dev have the same diffusers names and full-size
    shapes: nothing in the tensors tells them apart. Detection reports the tie and takes Flux.1 (first
    in table order); musubi-tuner's metadata names HunyuanVideo."""
    shapes = {"transformer_blocks.0.attn.to_q": (3072, 3072), "single_transformer_blocks.3.proj_out": (3072, 15360)}
    shared = tmp_path / "shared.safetensors"
    _lora(shared, shapes)
    report = loratool.inspect(shared)
    assert report.architecture == "flux1"
    assert "ambiguous between" in report.architecture_reason and ARCH in report.architecture_reason
    for meta in ({"ss_base_model_version": "hunyuan_video"}, {"modelspec.architecture": "hunyuan-video/lora"}):
        named = tmp_path / "named.safetensors"
        _lora(named, shapes, meta)
        assert loratool.inspect(named).architecture == ARCH
    flux = tmp_path / "flux.safetensors"  # Flux.1's own embedder: not HunyuanVideo's (a Conv3d there)
    _lora(flux, {**shapes, "x_embedder": (3072, 64)})
    assert loratool.inspect(flux).architecture == "flux1"
    # a dual-stream block's attention alone is Qwen-Image's too (60 blocks of width 3072)
    late = tmp_path / "late.safetensors"
    _lora(late, {"transformer_blocks.19.attn.to_q": (3072, 3072)})
    report = loratool.inspect(late)
    assert report.architecture == "qwen_image" and ARCH in report.architecture_reason


def test_real_widths_musubi_attention_names_tie_with_flux1_mlp_names_do_not(tmp_path) -> None:
    """musubi-tuner's kohya names: `double_blocks_N_img_attn_qkv` and `single_blocks_N_linear1` are
    also BFL Flux.1 names (`img_attn.qkv` flattened); `img_mlp_fc1` is Tencent's alone."""

    def kohya(path, modules: dict[str, tuple[int, int]], metadata=None) -> None:
        tensors = {}
        for module, (rows, cols) in modules.items():
            tensors[f"lora_unet_{module}.lora_down.weight"] = torch.zeros(4, cols)
            tensors[f"lora_unet_{module}.lora_up.weight"] = torch.zeros(rows, 4)
            tensors[f"lora_unet_{module}.alpha"] = torch.tensor(4.0)
        save_file(tensors, str(path), metadata=metadata)

    attention = {"double_blocks_0_img_attn_qkv": (9216, 3072), "single_blocks_0_linear1": (21504, 3072)}
    path = tmp_path / "attention.safetensors"
    kohya(path, attention)
    report = loratool.inspect(path)
    assert report.architecture == "flux1" and ARCH in report.architecture_reason
    kohya(path, attention, {"ss_base_model_version": "hunyuan_video", "modelspec.architecture": "hunyuan-video/lora"})
    assert loratool.inspect(path).architecture == ARCH
    kohya(path, {**attention, "double_blocks_0_img_mlp_fc1": (12288, 3072)})
    report = loratool.inspect(path)
    assert report.architecture == ARCH and not [f for f in report.findings if f.severity == "error"]
