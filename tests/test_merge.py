"""`loratool merge` as a tool: output layout, refusals, safety and the CLI.

The numbers against PEFT and diffusers live in test_merge_peft.py and test_merge_diffusers.py;
here the base is a narrow single-file checkpoint (test_inspect_base.bases) or a diffusers folder
built from the tiny reference models, and the oracle is tests/deltas.py (every canonical module's
scaled update, straight from the LoRA's factors).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from deltas import deltas
from safetensors.torch import load_file, save_file
from test_inspect_base import bases
from tiny_models import clip_text_model, sd15_unet

import loratool
from loratool.archs import get_architecture
from loratool.cli import main
from loratool.commands.merge import merge
from loratool.errors import InputError, MergeError, OutputError
from loratool.io.safetensors_file import SafetensorsFile
from loratool.sizes import parse_size

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SD15 = FIXTURES / "kohya_sd15.safetensors"


@pytest.fixture(scope="module")
def base_files(tmp_path_factory) -> dict[str, Path]:
    paths = bases(tmp_path_factory.mktemp("bases"))
    # Real checkpoints carry metadata and tensors no LoRA touches (VAE, buffers).
    sd1 = load_file(paths["sd1"])
    sd1["first_stage_model.decoder.conv_in.weight"] = torch.randn(4, 4, 3, 3)
    sd1["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(8)[None]
    save_file(sd1, paths["sd1"], {"modelspec.title": "tiny sd1", "format": "pt"})
    return paths


def native_key(arch_name: str, target: str) -> str:
    arch = get_architecture(arch_name)
    spec = arch.modules[target]
    return arch.components[spec.component].file_prefixes[0] + spec.native_weight


def test_single_file_keeps_layout_and_copies_untouched_bytes(tmp_path, base_files):
    out = tmp_path / "merged.safetensors"
    report = merge(base_files["sd1"], [SD15], out, device="cpu")
    base, merged = SafetensorsFile(base_files["sd1"]), SafetensorsFile(out)
    assert merged.keys() == base.keys()
    assert merged.metadata == base.metadata
    touched = {native_key("sd1", t) for t in deltas(SD15)}
    for key in base:
        assert merged.info(key).dtype == base.info(key).dtype
        assert merged.info(key).shape == base.info(key).shape
        if key not in touched:
            assert merged.read_bytes(key) == base.read_bytes(key), key
    assert report.tensors_updated == len(touched)
    assert report.tensors_copied == len(base) - len(touched)
    assert report.loras[0].matched == report.loras[0].modules and not report.loras[0].unmatched


def test_every_update_is_the_scaled_product(tmp_path, base_files):
    out = tmp_path / "merged.safetensors"
    merge(base_files["sd1"], [SD15], out, weights=[0.7], device="cpu")
    base, merged = load_file(base_files["sd1"]), load_file(out)
    for target, delta in deltas(SD15).items():
        key = native_key("sd1", target)
        expected = base[key] + 0.7 * delta.reshape(base[key].shape)
        torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-6)


def test_plus_one_then_minus_one_gives_back_the_base(tmp_path, base_files):
    once, back = tmp_path / "once.safetensors", tmp_path / "back.safetensors"
    merge(base_files["sd1"], [SD15], once, device="cpu")
    merge(once, [SD15], back, weights=[-1.0], device="cpu")
    base, restored = load_file(base_files["sd1"]), load_file(back)
    for key, value in base.items():
        torch.testing.assert_close(restored[key], value, rtol=0, atol=1e-6)


def test_unmatched_modules_are_an_error_unless_allowed(tmp_path, base_files):
    lora = FIXTURES / "kohya_flux.safetensors"  # has CLIP-L modules; the Flux base is transformer-only
    out = tmp_path / "merged.safetensors"
    with pytest.raises(MergeError, match=r"lora_te1_\w+ and \d+ more matches nothing"):
        merge(base_files["flux1"], [lora], out, device="cpu")
    assert not out.exists()
    report = merge(base_files["flux1"], [lora], out, device="cpu", allow_unmatched=True)
    summary = report.loras[0]
    assert summary.unmatched and all(name.startswith("lora_te1_") for name in summary.unmatched)
    assert summary.matched + len(summary.unmatched) == summary.modules


def test_a_lora_for_another_model_is_refused(tmp_path, base_files):
    out = tmp_path / "merged.safetensors"
    with pytest.raises(MergeError, match=r"none of its .* modules is in the base"):
        merge(base_files["sd1"], [FIXTURES / "flux_diffusers.safetensors"], out, device="cpu", allow_unmatched=True)
    assert not out.exists()


@pytest.mark.parametrize("fixture", ["lycoris_loha.safetensors", "lycoris_lokr.safetensors"])
def test_loha_and_lokr_merge_as_their_scaled_update(tmp_path, base_files, fixture):
    """Dense kinds (3x3 convs with the kernel folded into w_b, LoKr with both factors full at scale 1)
    go through the same walk as LoRA; tests/test_merge_lycoris.py checks them against LyCORIS itself."""
    out = tmp_path / "merged.safetensors"
    merge(base_files["sd1"], [FIXTURES / fixture], out, weights=[-0.6], device="cpu")
    base, merged = load_file(base_files["sd1"]), load_file(out)
    updates = deltas(FIXTURES / fixture)
    assert updates
    for target, delta in updates.items():
        key = native_key("sd1", target)
        expected = base[key] - 0.6 * delta.reshape(base[key].shape)
        torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-6)


def test_non_finite_factors_stop_the_merge_and_leave_dest_alone(tmp_path, base_files):
    lora = tmp_path / "nan.safetensors"
    tensors = load_file(SD15)
    up = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[up] = tensors[up].clone()
    tensors[up].view(-1)[0] = float("nan")
    save_file(tensors, lora)
    out = tmp_path / "merged.safetensors"
    out.write_bytes(b"previous")
    with pytest.raises(InputError, match=rf"tensor '{up}' holds NaN or inf"):
        merge(base_files["sd1"], [lora], out, device="cpu", force=True)
    assert out.read_bytes() == b"previous"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_fp16_overflow_is_caught_before_writing(tmp_path, base_files):
    half = tmp_path / "half.safetensors"
    save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(base_files["sd1"]).items()}, half)
    out = tmp_path / "merged.safetensors"
    with pytest.raises(MergeError, match=r"beyond torch.float16's range"):
        merge(half, [SD15], out, weights=[1e7], device="cpu")
    assert not out.exists()


def test_dtype_option_casts_every_float_tensor_once(tmp_path, base_files):
    full, half = tmp_path / "full.safetensors", tmp_path / "half.safetensors"
    merge(base_files["sd1"], [SD15], full, device="cpu")
    report = merge(base_files["sd1"], [SD15], half, device="cpu", dtype="fp16")
    want = load_file(full)
    got = load_file(half)
    for key, value in want.items():
        expected = value.half() if value.is_floating_point() else value
        assert got[key].dtype == expected.dtype
        assert torch.equal(got[key], expected), key
    assert report.tensors_cast > 0 and report.tensors_copied == 1  # only the int position_ids pass through


def test_destination_rules(tmp_path, base_files):
    out = tmp_path / "merged.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="exists"):
        merge(base_files["sd1"], [SD15], out, device="cpu")
    assert out.read_bytes() == b"keep me"
    with pytest.raises(OutputError, match="is an input"):
        merge(base_files["sd1"], [SD15], base_files["sd1"], device="cpu", force=True)
    with pytest.raises(OutputError, match="is an input"):
        merge(base_files["sd1"], [SD15], SD15, device="cpu", force=True)


def test_weights_must_match_the_loras(tmp_path, base_files):
    with pytest.raises(MergeError, match="2 weight"):
        merge(base_files["sd1"], [SD15], tmp_path / "o.safetensors", weights=[1.0, 2.0], device="cpu")


def test_shard_size_needs_a_directory_base(tmp_path, base_files):
    with pytest.raises(MergeError, match="--shard-size applies to model directories"):
        merge(base_files["sd1"], [SD15], tmp_path / "o.safetensors", shard_size=1000, device="cpu")


def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, base_files):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(InputError, match="no CUDA device"):
        merge(base_files["sd1"], [SD15], tmp_path / "o.safetensors", device="cuda")


@pytest.mark.gpu
def test_cuda_merge_equals_cpu_merge(tmp_path, base_files):
    cpu, gpu = tmp_path / "cpu.safetensors", tmp_path / "gpu.safetensors"
    merge(base_files["sd1"], [SD15], cpu, device="cpu")
    report = merge(base_files["sd1"], [SD15], gpu, device="cuda")
    assert report.device.startswith("cuda")
    want, got = load_file(cpu), load_file(gpu)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6)


# -- diffusers folders ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline") / "sd15"
    torch.manual_seed(0)
    sd15_unet().save_pretrained(root / "unet", max_shard_size="300KB")  # sharded component
    clip_text_model().save_pretrained(root / "text_encoder")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "DDIMScheduler"}\n')
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    shutil.copy(root / "text_encoder" / "model.safetensors", root / "text_encoder" / "model.fp16.safetensors")
    return root


def _folder_tensors(root: Path) -> dict[str, torch.Tensor]:
    out = {}
    for component in ("unet", "text_encoder"):
        for f in sorted((root / component).glob("*.safetensors")):
            if ".fp16." not in f.name:
                out.update({f"{component}.{k}": v for k, v in load_file(f).items()})
    return out


def test_diffusers_folder_base_gives_the_same_folder_merged(tmp_path, pipeline_dir):
    out = tmp_path / "merged"
    report = merge(pipeline_dir, [SD15], out, weights=[0.5], device="cpu")
    assert report.loras[0].matched == report.loras[0].modules
    assert report.skipped == ["text_encoder/model.fp16.safetensors"]
    # Same files (the stale variant left out), configs copied, shards and index kept.
    want = sorted(p.relative_to(pipeline_dir).as_posix() for p in pipeline_dir.rglob("*") if p.is_file())
    got = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert got == [p for p in want if p != "text_encoder/model.fp16.safetensors"]
    assert any("-of-" in p for p in got)
    index = json.loads((out / "unet" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    for key, shard in index["weight_map"].items():
        assert key in SafetensorsFile(out / "unet" / shard)
    base, merged = _folder_tensors(pipeline_dir), _folder_tensors(out)
    assert merged.keys() == base.keys()
    found = 0
    for target, delta in deltas(SD15).items():
        key = target + ".weight"
        if key not in base:  # transformers 5 saves CLIP without the text_model. level
            key = key.replace("text_encoder.text_model.", "text_encoder.")
        torch.testing.assert_close(merged[key], base[key] + 0.5 * delta.reshape(base[key].shape), rtol=0, atol=1e-6)
        found += 1
    assert found == report.tensors_updated


# -- CLI ----------------------------------------------------------------------------------------------
def test_cli_merge_reports_json_and_takes_negative_weights(tmp_path, base_files):
    out = tmp_path / "merged.safetensors"
    args = ["merge", str(base_files["sd1"]), str(SD15), "-o", str(out), "-w", "-0.3", "--device", "cpu", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["loras"][0]["strength"] == -0.3
    assert data["loras"][0]["matched"] == data["loras"][0]["modules"] > 0


def test_cli_errors_are_one_line_with_exit_2(tmp_path, base_files):
    out = tmp_path / "merged.safetensors"
    args = ["merge", str(base_files["flux1"]), str(FIXTURES / "kohya_flux.safetensors"), "-o", str(out), "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert "--allow-unmatched" in result.stderr
    assert not out.exists()


def test_cli_human_summary_lists_unmatched_modules(tmp_path, base_files):
    out = tmp_path / "merged.safetensors"
    lora = FIXTURES / "kohya_flux.safetensors"
    result = CliRunner().invoke(
        main, ["merge", str(base_files["flux1"]), str(lora), "-o", str(out), "--allow-unmatched"]
    )
    assert result.exit_code == 0, result.output
    assert "unmatched" in result.stdout and "lora_te1_" in result.stdout


def test_public_api_exports_merge():
    assert loratool.merge is not None and "merge" in loratool.__all__


@pytest.mark.parametrize(
    ("text", "size"),
    [("5GB", 5 * 10**9), ("500MiB", 500 * 2**20), ("2g", 2 * 10**9), ("1048576", 1048576), ("1.5KB", 1500)],
)
def test_shard_sizes_parse_like_hf(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "5 parsecs", "0", "-1GB"])
def test_bad_shard_sizes_are_input_errors(text):
    with pytest.raises(InputError, match="size"):
        parse_size(text)


def test_untouched_bf16_tensors_that_overflow_fp16_are_caught(tmp_path, base_files):
    bf16 = tmp_path / "bf16.safetensors"
    tensors = {k: v.bfloat16() if v.is_floating_point() else v for k, v in load_file(base_files["sd1"]).items()}
    tensors["first_stage_model.decoder.conv_in.weight"].fill_(1e6)  # no LoRA touches the VAE
    save_file(tensors, bf16)
    out = tmp_path / "merged.safetensors"
    with pytest.raises(MergeError, match=r"first_stage_model\.decoder\.conv_in\.weight: .* when cast"):
        merge(bf16, [SD15], out, device="cpu", dtype="fp16")
    assert not out.exists()


def test_dest_inside_the_directory_of_an_index_file_base_is_refused(tmp_path):
    from tiny_models import llama

    model_dir = tmp_path / "llama"
    llama().save_pretrained(model_dir, max_shard_size="20KB")
    with pytest.raises(OutputError, match="lies inside the input"):
        merge(model_dir / "model.safetensors.index.json", [FIXTURES / "peft_llama"], model_dir / "merged", device="cpu")


def test_dora_on_a_fused_module_splits_its_magnitude_over_a_diffusers_folder(tmp_path):
    """A fused qkv DoRA module merged into separate to_q/to_k/to_v weights equals the same merge
    into the fused single-file weight: DoRA's norm is per output row, so the rows split cleanly."""
    from tiny_models import flux_transformer, single_file

    torch.manual_seed(0)
    model = flux_transformer()
    folder = tmp_path / "flux"
    model.save_pretrained(folder / "transformer")
    index = {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    fused = tmp_path / "flux.safetensors"
    save_file(single_file(get_architecture("flux1"), {"transformer": model}), fused)
    lora = tmp_path / "dora.safetensors"
    tensors = load_file(FIXTURES / "flux_comfyui.safetensors")
    module = "diffusion_model.double_blocks.0.img_attn.qkv"
    rows = tensors[module + ".lora_B.weight"].shape[0]
    tensors[module + ".lora_magnitude_vector"] = torch.rand(rows) + 0.5
    save_file(tensors, lora)
    merge(folder, [lora], tmp_path / "out", device="cpu")
    merge(fused, [lora], tmp_path / "out.safetensors", device="cpu")
    split = load_file(tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors")
    whole = load_file(tmp_path / "out.safetensors")["double_blocks.0.img_attn.qkv.weight"]
    parts = [split[f"transformer_blocks.0.attn.to_{p}.weight"] for p in "qkv"]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-6, atol=1e-6)
    base = model.state_dict()["transformer_blocks.0.attn.to_q.weight"]
    assert not torch.allclose(parts[0], base)


def test_a_tied_reading_that_cannot_merge_does_not_stop_the_one_that_can(tmp_path, base_files, monkeypatch):
    """Names that fit SD1 and SD2 alike are tried both ways against the base; a reading whose
    modules do not fit the base at all (a MergeError) is set aside, not raised."""
    from loratool.merging import match as matching

    torch.manual_seed(0)
    base = base_files["sd1"]
    block = "lora_unet_down_blocks_0_attentions_0"
    lora_tensors = {}
    for name, width in ((f"{block}_proj_in", 32), (f"{block}_transformer_blocks_0_attn1_to_q", 32)):
        lora_tensors[f"{name}.lora_down.weight"] = torch.randn(2, width)  # LyCORIS-flat: SD1 or SD2
        lora_tensors[f"{name}.lora_up.weight"] = torch.randn(width, 2)
    lora = tmp_path / "tied.safetensors"
    save_file(lora_tensors, str(lora))
    assert loratool.inspect(lora).architecture == "sd1"

    real = matching.match

    def sd2_does_not_fit(adapter, *args, **kwargs):
        if adapter.arch is not None and adapter.arch.name == "sd2":
            raise MergeError("this reading does not fit the base")
        return real(adapter, *args, **kwargs)

    monkeypatch.setattr(matching, "match", sd2_does_not_fit)
    report = merge(base, [lora], tmp_path / "merged.safetensors", device="cpu")
    assert report.loras[0].matched == 2
