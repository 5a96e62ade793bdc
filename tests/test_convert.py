"""convert: refusals, overwrite safety, byte-for-byte copies, metadata, fuse/split and row-order
surgery on synthetic files whose expected result is computed here by hand."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from deltas import assert_same_deltas, deltas
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loratool.cli import main
from loratool.commands.convert import convert
from loratool.errors import ConversionError, OutputError
from loratool.io.safetensors_file import SafetensorsFile

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
HIDDEN, MLP = 32, 128  # the tiny Flux of fixtures/tiny_models.py


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loratool.cli", *args], capture_output=True, text=True, check=False)


def assert_one_line_refusal(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def g(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# -- refusals ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fixture", "to", "words"),
    [
        ("lycoris_loha.safetensors", "peft", ("text_encoder, unet",)),  # one model per PEFT dir
        ("lycoris_loha.safetensors", "diffusers", ("LoHa",)),
        ("lycoris_lokr.safetensors", "diffusers", ("LoKr",)),
        ("kohya_sd15.safetensors", "peft", ("text_encoder, unet",)),
    ],
)
def test_unconvertible_input_is_refused_and_nothing_written(tmp_path, fixture, to, words):
    dest = tmp_path / "out"
    result = run_cli("convert", str(FIXTURES / fixture), "--to", to, "-o", str(dest))
    assert_one_line_refusal(result, *words)
    assert list(tmp_path.iterdir()) == []


def ambiguous_proj_in(tmp_path: Path) -> Path:
    """A narrow proj_in with 2-D factors: SD1's 1x1 conv (LyCORIS flattens those) or SD2's Linear;
    the two diffusers outputs differ in the factors' shapes, so the reading matters."""
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    path = tmp_path / "ambiguous.safetensors"
    save_file({f"{name}.lora_down.weight": g(4, 32), f"{name}.lora_up.weight": g(32, 4, seed=1)}, str(path))
    return path


def test_names_two_architectures_read_differently_are_refused(tmp_path):
    src = ambiguous_proj_in(tmp_path)
    result = run_cli("convert", str(src), "--to", "diffusers", "-o", str(tmp_path / "out"))
    assert_one_line_refusal(result, "sd1", "sd2", "--arch")
    assert list(tmp_path.iterdir()) == [src]


def test_ambiguous_names_convert_once_the_architecture_is_given(tmp_path):
    src = FIXTURES / "diffusers_legacy_sd15.safetensors"
    dest = tmp_path / "out.safetensors"
    result = run_cli("convert", str(src), "--to", "diffusers", "-o", str(dest), "--arch", "sd1")
    assert result.returncode == 0, result.stderr
    assert_same_deltas(src, dest)
    assert metadata_of(dest)["ss_base_model_version"] == "sd_v1"  # the next reader need not guess
    result = run_cli(
        "convert", str(ambiguous_proj_in(tmp_path)), "--to", "diffusers", "-o", str(tmp_path / "a"), "--arch", "sd2"
    )
    assert result.returncode == 0, result.stderr


def test_unknown_architecture_to_kohya_is_refused(tmp_path):
    src = tmp_path / "odd.safetensors"
    save_file(
        {"lora_unet_nothing_we_know.lora_down.weight": g(4, 8), "lora_unet_nothing_we_know.lora_up.weight": g(8, 4)},
        str(src),
    )
    result = run_cli("convert", str(src), "--to", "kohya", "-o", str(tmp_path / "out.safetensors"))
    assert_one_line_refusal(result, "architecture")
    assert not (tmp_path / "out.safetensors").exists()


def test_tensors_no_layout_explains_are_refused_not_dropped(tmp_path):
    tensors = tensors_of(FIXTURES / "kohya_sd15.safetensors")
    tensors["some_stray_tensor"] = torch.zeros(3)
    src = tmp_path / "stray.safetensors"
    save_file(tensors, str(src))
    result = run_cli("convert", str(src), "--to", "diffusers", "-o", str(tmp_path / "out.safetensors"))
    assert_one_line_refusal(result, "some_stray_tensor", "drop")


def test_lora_bias_cannot_go_to_kohya(tmp_path):
    src = tmp_path / "bias.safetensors"
    path = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file(
        {f"{path}.lora_A.weight": g(4, 32), f"{path}.lora_B.weight": g(32, 4, seed=1), f"{path}.lora_B.bias": g(32)},
        str(src),
    )
    result = run_cli("convert", str(src), "--to", "kohya", "-o", str(tmp_path / "out.safetensors"), "--arch", "sd1")
    assert_one_line_refusal(result, "bias", "to_q")
    assert not (tmp_path / "out.safetensors").exists()
    out = tmp_path / "keep.safetensors"
    convert(src, "diffusers", out, arch="sd1")
    assert torch.equal(tensors_of(out)[f"{path}.lora_B.bias"], tensors_of(src)[f"{path}.lora_B.bias"])


# -- outputs are never clobbered -----------------------------------------------------------------------
def test_existing_output_needs_force(tmp_path):
    dest = tmp_path / "out.safetensors"
    dest.write_bytes(b"precious")
    result = run_cli("convert", str(FIXTURES / "kohya_sd15.safetensors"), "--to", "diffusers", "-o", str(dest))
    assert_one_line_refusal(result, "--force")
    assert dest.read_bytes() == b"precious"
    result = run_cli(
        "convert", str(FIXTURES / "kohya_sd15.safetensors"), "--to", "diffusers", "-o", str(dest), "--force"
    )
    assert result.returncode == 0, result.stderr
    assert_same_deltas(FIXTURES / "kohya_sd15.safetensors", dest)


def test_output_may_not_be_the_input(tmp_path):
    src = tmp_path / "in.safetensors"
    src.write_bytes((FIXTURES / "kohya_sd15.safetensors").read_bytes())
    with pytest.raises(OutputError, match="input"):
        convert(src, "kohya", src, force=True)
    assert src.read_bytes() == (FIXTURES / "kohya_sd15.safetensors").read_bytes()
    with pytest.raises(OutputError, match="input"):
        convert(FIXTURES / "peft_llama" / "adapter_model.safetensors", "peft", FIXTURES / "peft_llama", force=True)


def test_peft_dir_is_replaced_whole_with_force(tmp_path):
    dest = tmp_path / "adapter"
    convert(FIXTURES / "peft_llama", "peft", dest)
    (dest / "stale.txt").write_text("old")
    with pytest.raises(OutputError):
        convert(FIXTURES / "peft_llama", "peft", dest)
    convert(FIXTURES / "peft_llama", "peft", dest, force=True)
    assert sorted(p.name for p in dest.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary leftovers


def test_failed_conversion_leaves_an_existing_output_alone(tmp_path):
    dest = tmp_path / "out.safetensors"
    dest.write_bytes(b"precious")
    with pytest.raises(ConversionError):
        convert(FIXTURES / "lycoris_loha.safetensors", "diffusers", dest, force=True)
    assert dest.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


# -- bytes, metadata, alphas -----------------------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["kohya_sd15.safetensors", "kohya_sdxl.safetensors", "kohya_flux.safetensors"])
def test_kohya_diffusers_kohya_is_bit_identical(tmp_path, fixture):
    src = FIXTURES / fixture
    mid, back = tmp_path / "mid.safetensors", tmp_path / "back.safetensors"
    convert(src, "diffusers", mid)
    convert(mid, "kohya", back)
    a, b = tensors_of(src), tensors_of(back)
    assert sorted(a) == sorted(b)
    for key in a:
        if key.endswith(".alpha"):  # re-created from the diffusers config: same value, factors' dtype when exact
            assert float(a[key]) == float(b[key]), key
        else:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_unchanged_tensors_keep_their_exact_bytes(tmp_path):
    src = FIXTURES / "kohya_sdxl.safetensors"
    dest = tmp_path / "out.safetensors"
    report = convert(src, "diffusers", dest)
    assert report.tensors_computed == 0
    a, b = SafetensorsFile(src), SafetensorsFile(dest)
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    down = next(k for k in b if k.endswith("attn1.to_q.lora_A.weight") and "down_blocks.1.attentions.0" in k)
    assert a.read_bytes(f"{name}.lora_down.weight") == b.read_bytes(down)


def test_metadata_is_kept_and_hashes_recomputed(tmp_path):
    src = FIXTURES / "kohya_flux.safetensors"
    dest = tmp_path / "out.safetensors"
    convert(src, "diffusers", dest)
    before, after = metadata_of(src), metadata_of(dest)
    for key, value in before.items():
        if key.startswith(("ss_", "modelspec.")) and key not in ("ss_network_dim", "ss_network_alpha"):
            assert after[key] == value, key
    raw = dest.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert after["sshs_model_hash"] == hashlib.sha256(raw[8 + header_len :]).hexdigest()
    assert after["sshs_legacy_hash"] == hashlib.sha256(raw[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    lora_meta = json.loads(after["lora_adapter_metadata"])
    assert lora_meta["transformer.r"] == 4


def test_network_fields_are_recomputed_from_the_modules(tmp_path):
    tensors = tensors_of(FIXTURES / "kohya_sd15.safetensors")
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors[f"{name}.alpha"] = torch.tensor(1.5)
    src = tmp_path / "varied.safetensors"
    save_file(tensors, str(src), metadata={**metadata_of(FIXTURES / "kohya_sd15.safetensors"), "ss_network_alpha": "4"})
    mid, back = tmp_path / "mid.safetensors", tmp_path / "back.safetensors"
    convert(src, "diffusers", mid)
    convert(mid, "kohya", back)
    assert metadata_of(back)["ss_network_alpha"] == "Dynamic"
    assert metadata_of(back)["ss_network_dim"] == "Dynamic"  # the fixture mixes ranks 2 and 4
    assert float(tensors_of(back)[f"{name}.alpha"]) == 1.5


@pytest.mark.parametrize(("alpha", "dtype"), [(16.0, "BF16"), (0.1, "F32"), (2.5, "BF16")])
def test_alpha_is_stored_in_the_factors_dtype_only_when_exact(tmp_path, alpha, dtype):
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    src = tmp_path / "bf16.safetensors"
    save_file(
        {
            f"unet.{path}.lora_A.weight": g(4, 32, dtype=torch.bfloat16),
            f"unet.{path}.lora_B.weight": g(32, 4, seed=1, dtype=torch.bfloat16),
        },
        str(src),
        metadata={"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": alpha})},
    )
    dest = tmp_path / "out.safetensors"
    convert(src, "kohya", dest, arch="sd1")
    f = SafetensorsFile(dest)
    key = "lora_unet_" + path.replace(".", "_") + ".alpha"
    assert f.info(key).dtype == dtype
    assert float(f.load(key)) == pytest.approx(alpha, rel=1e-7)


def test_rslora_scale_survives_kohya(tmp_path):
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    src = tmp_path / "rs.safetensors"
    meta = {"unet.r": 16, "unet.lora_alpha": 8, "unet.use_rslora": True}
    save_file(
        {f"unet.{path}.lora_A.weight": g(16, 32), f"unet.{path}.lora_B.weight": g(32, 16, seed=1)},
        str(src),
        metadata={"lora_adapter_metadata": json.dumps(meta)},
    )
    dest = tmp_path / "out.safetensors"
    convert(src, "kohya", dest, arch="sd1")
    alpha = float(tensors_of(dest)["lora_unet_" + path.replace(".", "_") + ".alpha"])
    assert alpha / 16 == pytest.approx(8 / 4, rel=1e-7)  # kohya's alpha/r equals rsLoRA's alpha/sqrt(r)
    assert_same_deltas(src, dest, rtol=1e-6, atol=0)


def test_json_report(tmp_path):
    dest = tmp_path / "out.safetensors"
    result = CliRunner().invoke(
        main, ["convert", str(FIXTURES / "kohya_flux.safetensors"), "--to", "diffusers", "-o", str(dest), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["target"] == "diffusers" and report["architecture"] == "flux1"
    assert report["modules_in"] == 38 and report["modules_out"] == 38 + 4 * 2 + 2 * 3  # qkv split in 3, linear1 in 4
    assert any("split into 3 parts" in n for n in report["notes"])


# -- fused <-> split ---------------------------------------------------------------------------------------
def flux_kohya(tmp_path: Path, tensors: dict[str, torch.Tensor], name: str = "flux.safetensors") -> Path:
    path = tmp_path / name
    save_file(tensors, str(path), metadata={"ss_base_model_version": "flux1"})
    return path


def test_block_diagonal_fused_up_splits_into_the_original_parts(tmp_path):
    """kohya's split_qkv layout: downs stacked (3r rows), up block-diagonal."""
    r = 4
    downs = [g(r, HIDDEN, seed=i) for i in range(3)]
    ups = [g(HIDDEN, r, seed=10 + i) for i in range(3)]
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    src = flux_kohya(
        tmp_path,
        {
            f"{name}.lora_down.weight": torch.cat(downs),
            f"{name}.lora_up.weight": torch.block_diag(*ups),
            f"{name}.alpha": torch.tensor(6.0),
        },
    )
    dest = tmp_path / "split.safetensors"
    convert(src, "diffusers", dest)
    out = tensors_of(dest)
    for i, part in enumerate(("to_q", "to_k", "to_v")):
        key = f"transformer.transformer_blocks.0.attn.{part}"
        assert torch.equal(out[f"{key}.lora_A.weight"], downs[i])
        assert torch.equal(out[f"{key}.lora_B.weight"], ups[i])
    config = json.loads(metadata_of(dest)["lora_adapter_metadata"])
    assert config["transformer.r"] == r and config["transformer.lora_alpha"] == 2  # 6/12 per rank kept
    assert_same_deltas(src, dest, rtol=1e-6, atol=0)
    back = tmp_path / "back.safetensors"
    convert(dest, "kohya", back)
    assert torch.equal(tensors_of(back)[f"{name}.lora_up.weight"], torch.block_diag(*ups))
    assert_same_deltas(src, back, rtol=1e-6, atol=0)


def diffusers_flux(tmp_path: Path, parts: dict[str, tuple[torch.Tensor, torch.Tensor]], alphas: dict[str, float]):
    tensors = {}
    for path, (down, up) in parts.items():
        tensors[f"transformer.{path}.lora_A.weight"] = down
        tensors[f"transformer.{path}.lora_B.weight"] = up
    pattern = {"^" + re.escape(p): a for p, a in alphas.items()}
    meta = {"transformer.r": 4, "transformer.lora_alpha": 4, "transformer.alpha_pattern": pattern}
    src = tmp_path / "diffusers_flux.safetensors"
    # Narrow attention-only factors fit SD3's names as well as Flux's: the metadata says which model.
    metadata = {"lora_adapter_metadata": json.dumps(meta), "modelspec.architecture": "flux-1-dev"}
    save_file(tensors, str(src), metadata=metadata)
    return src


def test_parts_with_different_downs_and_alphas_fuse_with_the_same_update(tmp_path):
    block = "transformer_blocks.0.attn"
    parts = {
        f"{block}.{p}": (g(4, HIDDEN, seed=i), g(HIDDEN, 4, seed=20 + i))
        for i, p in enumerate(("to_q", "to_k", "to_v"))
    }
    src = diffusers_flux(tmp_path, parts, {f"{block}.to_k": 8.0, f"{block}.to_v": 1.0})
    dest = tmp_path / "kohya.safetensors"
    report = convert(src, "kohya", dest)
    out = tensors_of(dest)
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    assert out[f"{name}.lora_down.weight"].shape == (12, HIDDEN)
    assert any("fused into double_blocks.0.img_attn.qkv" in n for n in report.notes)
    assert_same_deltas(src, dest, rtol=1e-6, atol=1e-7)
    back = tmp_path / "back.safetensors"
    convert(dest, "diffusers", back)
    assert_same_deltas(src, back, rtol=1e-6, atol=1e-7)


def test_equal_scales_fuse_with_alpha_scaled_to_the_summed_rank(tmp_path):
    block = "transformer_blocks.1.attn"
    parts = {
        f"{block}.{p}": (g(4, HIDDEN, seed=i), g(HIDDEN, 4, seed=30 + i))
        for i, p in enumerate(("add_q_proj", "add_k_proj", "add_v_proj"))
    }
    src = diffusers_flux(tmp_path, parts, {})
    dest = tmp_path / "kohya.safetensors"
    convert(src, "kohya", dest)
    out = tensors_of(dest)
    name = "lora_unet_double_blocks_1_txt_attn_qkv"
    assert float(out[f"{name}.alpha"]) == 12.0  # scale 4/4 kept at rank 12 (kohya's split_qkv forgot this)
    assert torch.equal(out[f"{name}.lora_up.weight"], torch.block_diag(*(u for _, u in parts.values())))
    assert_same_deltas(src, dest, rtol=0, atol=0)


def test_missing_part_gets_zero_rows_and_comes_back_absent(tmp_path):
    block = "transformer_blocks.0.attn"
    parts = {
        f"{block}.to_q": (g(4, HIDDEN), g(HIDDEN, 4, seed=1)),
        f"{block}.to_v": (g(4, HIDDEN, seed=2), g(HIDDEN, 4, seed=3)),
    }
    src = diffusers_flux(tmp_path, parts, {})
    dest = tmp_path / "kohya.safetensors"
    convert(src, "kohya", dest)
    up = tensors_of(dest)["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    assert up.shape == (3 * HIDDEN, 8) and not up[HIDDEN : 2 * HIDDEN].any()
    back = tmp_path / "back.safetensors"
    report = convert(dest, "diffusers", back)
    assert not any(".to_k." in k for k in tensors_of(back))
    assert any("to_k: zero update" in n for n in report.notes)
    assert_same_deltas(src, back, rtol=0, atol=0)


def test_linear1_without_its_mlp_part_cannot_be_fused(tmp_path):
    block = "single_transformer_blocks.0.attn"
    parts = {
        f"{block}.{p}": (g(4, HIDDEN, seed=i), g(HIDDEN, 4, seed=9 + i)) for i, p in enumerate(("to_q", "to_k", "to_v"))
    }
    src = diffusers_flux(tmp_path, parts, {})
    with pytest.raises(ConversionError, match=r"proj_mlp.*width is unknown"):
        convert(src, "kohya", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_linear1_split_sizes_come_from_the_tensors(tmp_path):
    name = "lora_unet_single_blocks_0_linear1"
    up = g(3 * HIDDEN + MLP, 4, seed=5)
    src = flux_kohya(tmp_path, {f"{name}.lora_down.weight": g(4, HIDDEN), f"{name}.lora_up.weight": up})
    dest = tmp_path / "split.safetensors"
    convert(src, "diffusers", dest)
    out = tensors_of(dest)
    prefix = "transformer.single_transformer_blocks.0"
    assert torch.equal(out[f"{prefix}.proj_mlp.lora_B.weight"], up[3 * HIDDEN :])
    assert torch.equal(out[f"{prefix}.attn.to_k.lora_B.weight"], up[HIDDEN : 2 * HIDDEN])
    back = tmp_path / "back.safetensors"
    convert(dest, "kohya", back)
    assert torch.equal(tensors_of(back)[f"{name}.lora_up.weight"], up)


def test_flux_final_modulation_rows_are_swapped_between_layouts(tmp_path):
    name = "lora_unet_final_layer_adaLN_modulation_1"
    up = g(2 * HIDDEN, 4, seed=7)
    src = flux_kohya(tmp_path, {f"{name}.lora_down.weight": g(4, HIDDEN), f"{name}.lora_up.weight": up})
    dest = tmp_path / "d.safetensors"
    convert(src, "diffusers", dest)
    ours = tensors_of(dest)["transformer.norm_out.linear.lora_B.weight"]
    assert torch.equal(ours, torch.cat([up[HIDDEN:], up[:HIDDEN]]))
    back = tmp_path / "back.safetensors"
    convert(dest, "kohya", back)
    assert torch.equal(tensors_of(back)[f"{name}.lora_up.weight"], up)
    d = deltas(dest)["transformer.norm_out.linear"]
    assert torch.equal(d, deltas(src)["transformer.norm_out.linear"])


def test_one_component_goes_to_a_peft_dir_that_peft_merges_exactly(tmp_path):
    """A UNet-only kohya LoRA -> PEFT dir -> PeftModel on the tiny SD1.5 UNet: each merged weight
    moves by exactly the file's scale * B@A; and back to kohya gives the same factor bytes."""
    from peft import PeftModel
    from tiny_models import sd15_unet

    tensors = tensors_of(FIXTURES / "kohya_sd15.safetensors")
    unet_only = {k: v for k, v in tensors.items() if k.startswith("lora_unet_")}
    src = tmp_path / "unet.safetensors"
    save_file(unet_only, str(src), metadata=metadata_of(FIXTURES / "kohya_sd15.safetensors"))
    convert(src, "peft", tmp_path / "adapter")
    torch.manual_seed(0)
    base = sd15_unet()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).merge_and_unload().state_dict()
    expected = deltas(src)
    assert len(expected) == len({k.split(".", 1)[0] for k in unet_only})
    for target, dw in expected.items():
        key = target.split(".", 1)[1] + ".weight"
        torch.testing.assert_close((merged[key] - before[key]).flatten(1), dw, rtol=0, atol=1e-7)
    back = tmp_path / "back.safetensors"
    convert(tmp_path / "adapter", "kohya", back)
    again = tensors_of(back)
    assert sorted(again) == sorted(unet_only)
    assert all(torch.equal(again[k], v) for k, v in unet_only.items() if not k.endswith(".alpha"))


def test_float32_alpha_comes_back_as_the_decimal_it_was(tmp_path):
    """alpha 0.1 stored as an F32 tensor is 0.100000001...; configs get 0.1 back, not 17 digits."""
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    src = tmp_path / "a.safetensors"
    save_file(
        {f"unet.{path}.lora_A.weight": g(4, 32), f"unet.{path}.lora_B.weight": g(32, 4, seed=1)},
        str(src),
        metadata={"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 0.1})},
    )
    mid, back = tmp_path / "k.safetensors", tmp_path / "d.safetensors"
    convert(src, "kohya", mid, arch="sd1")
    assert float(tensors_of(mid)["lora_unet_" + path.replace(".", "_") + ".alpha"]) != 0.1  # fp32 cannot hold it
    convert(mid, "diffusers", back)
    assert json.loads(metadata_of(back)["lora_adapter_metadata"])["unet.lora_alpha"] == 0.1


def test_flux_lora_transformer_and_lora_unet_mixture_reads_and_converts(tmp_path):
    """Some trainers mix kohya's BFL names with `lora_transformer_` + diffusers paths in one file."""
    tensors = {}
    for i, part in enumerate(("to_q", "to_k", "to_v")):
        name = f"lora_transformer_transformer_blocks_0_attn_{part}"
        tensors[f"{name}.lora_down.weight"] = g(4, HIDDEN, seed=i)
        tensors[f"{name}.lora_up.weight"] = g(HIDDEN, 4, seed=10 + i)
        tensors[f"{name}.alpha"] = torch.tensor(2.0)
    tensors["lora_unet_double_blocks_1_img_attn_proj.lora_down.weight"] = g(4, HIDDEN, seed=5)
    tensors["lora_unet_double_blocks_1_img_attn_proj.lora_up.weight"] = g(HIDDEN, 4, seed=6)
    src = flux_kohya(tmp_path, tensors)
    kohya, diffusers = tmp_path / "k.safetensors", tmp_path / "d.safetensors"
    convert(src, "kohya", kohya)
    assert sorted({k.split(".")[0] for k in tensors_of(kohya)}) == [
        "lora_unet_double_blocks_0_img_attn_qkv",
        "lora_unet_double_blocks_1_img_attn_proj",
    ]
    convert(src, "diffusers", diffusers)
    assert "transformer.transformer_blocks.0.attn.to_k.lora_A.weight" in tensors_of(diffusers)
    assert "transformer.transformer_blocks.1.attn.to_out.0.lora_B.weight" in tensors_of(diffusers)
    assert_same_deltas(src, kohya, rtol=1e-6, atol=0)
    assert_same_deltas(src, diffusers, rtol=0, atol=0)


def test_sdxl_kohya_with_diffusers_names_comes_out_in_sgm_names(tmp_path):
    src = FIXTURES / "kohya_sdxl.safetensors"
    diffusers_named = {}
    mid = tmp_path / "d.safetensors"
    convert(src, "diffusers", mid)
    for key, value in tensors_of(mid).items():  # rename the UNet to kohya + diffusers paths
        module, suffix = key.split(".lora_", 1)
        component, path = module.split(".", 1)
        prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[component]
        new_suffix = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}[suffix]
        diffusers_named[f"{prefix}{path.replace('.', '_')}.{new_suffix}"] = value
    for key, value in tensors_of(src).items():
        if key.endswith(".alpha") and not key.startswith("lora_unet_"):
            diffusers_named[key] = value
    named = tmp_path / "named.safetensors"
    save_file(diffusers_named, str(named), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    out = tmp_path / "sgm.safetensors"
    convert(named, "kohya", out)
    keys = {k.split(".")[0] for k in tensors_of(out)}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in keys
    assert not any(k.startswith("lora_unet_down_blocks") for k in keys)
    unet = {k: v for k, v in deltas(src).items() if k.startswith("unet.")}
    ours = deltas(out)
    assert unet.keys() <= ours.keys()
    for key, value in unet.items():  # UNet alphas were left out of the renamed file: compare B@A up to scale
        assert torch.allclose(ours[key] / ours[key].norm(), value / value.norm(), rtol=1e-5, atol=1e-7), key


def test_alpha_without_factors_is_reported_not_silently_dropped(tmp_path):
    tensors = tensors_of(FIXTURES / "kohya_sd15.safetensors")
    tensors["lora_unet_mid_block_attentions_0_proj_out_extra.alpha"] = torch.tensor(4.0)
    src = tmp_path / "alpha.safetensors"
    save_file(tensors, str(src), metadata=metadata_of(FIXTURES / "kohya_sd15.safetensors"))
    report = convert(src, "diffusers", tmp_path / "out.safetensors")
    assert any("proj_out_extra.alpha" in n and "not written" in n for n in report.notes)


def test_factors_that_cannot_belong_together_are_refused(tmp_path):
    tensors = tensors_of(FIXTURES / "kohya_sd15.safetensors")
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors[f"{name}.lora_up.weight"] = g(32, 3)  # rank 3 up against a rank-4 down
    src = tmp_path / "bad.safetensors"
    save_file(tensors, str(src))
    with pytest.raises(ConversionError, match=name):
        convert(src, "diffusers", tmp_path / "out.safetensors", arch="sd1")
    assert not (tmp_path / "out.safetensors").exists()


def test_fusing_parts_of_different_dtypes_rounds_none_of_them(tmp_path):
    block = "transformer_blocks.0.attn"
    down = g(4, HIDDEN).to(torch.bfloat16)
    parts = {
        f"{block}.{p}": (down.clone(), g(HIDDEN, 4, seed=40 + i, dtype=torch.bfloat16 if i == 0 else torch.float32))
        for i, p in enumerate(("to_q", "to_k", "to_v"))
    }
    src = diffusers_flux(tmp_path, parts, {})
    dest = tmp_path / "kohya.safetensors"
    convert(src, "kohya", dest)
    assert tensors_of(dest)["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].dtype == torch.float32
    assert_same_deltas(src, dest, rtol=0, atol=0)


def test_sd2_conv_shaped_factors_for_linear_projections_fit_peft(tmp_path):
    """Some SD2 LoRAs carry 1x1-conv factors for proj_in, a Linear in SD2: PEFT needs 2-D ones."""
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    down, up = g(4, 32, 1, 1), g(32, 4, 1, 1, seed=1)
    src = tmp_path / "sd2.safetensors"
    save_file(
        {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0)},
        str(src),
        metadata={"ss_base_model_version": "sd_v2"},
    )
    dest = tmp_path / "d.safetensors"
    convert(src, "diffusers", dest)
    out = tensors_of(dest)
    key = "unet.down_blocks.0.attentions.0.proj_in"
    assert out[f"{key}.lora_A.weight"].shape == (4, 32) and torch.equal(out[f"{key}.lora_A.weight"], down[:, :, 0, 0])
    assert out[f"{key}.lora_B.weight"].shape == (32, 4)
    assert_same_deltas(src, dest, rtol=0, atol=0)


def test_openclip_in_proj_lora_splits_into_q_k_v(tmp_path):
    """A ComfyUI-named LoRA on SD2's fused OpenCLIP in_proj becomes kohya q/k/v modules."""
    name = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj"
    up = g(3 * 32, 4, seed=3)
    src = tmp_path / "clip.safetensors"
    save_file(
        {f"{name}.lora_down.weight": g(4, 32), f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(4.0)},
        str(src),
        metadata={"ss_base_model_version": "sd_v2"},
    )
    dest = tmp_path / "k.safetensors"
    convert(src, "kohya", dest)
    out = tensors_of(dest)
    for i, part in enumerate(("q", "k", "v")):
        key = f"lora_te_text_model_encoder_layers_0_self_attn_{part}_proj"
        assert torch.equal(out[f"{key}.lora_up.weight"], up[32 * i : 32 * (i + 1)])
    assert_same_deltas(src, dest, rtol=0, atol=0)


def test_peft_dir_on_a_unet_keeps_its_saved_modules(tmp_path):
    """modules_to_save tensors travel with a PEFT dir, and so does the config entry naming them."""
    src = tmp_path / "ad"
    src.mkdir()
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file(
        {
            f"base_model.model.{path}.lora_A.weight": g(4, 32),
            f"base_model.model.{path}.lora_B.weight": g(32, 4, seed=1),
            "base_model.model.conv_in.weight": g(32, 4, 3, 3, seed=2),
        },
        str(src / "adapter_model.safetensors"),
    )
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["to_q"], "modules_to_save": ["conv_in"]}
    (src / "adapter_config.json").write_text(json.dumps(config))
    convert(src, "peft", tmp_path / "out")
    assert torch.equal(
        tensors_of(tmp_path / "out" / "adapter_model.safetensors")["base_model.model.conv_in.weight"],
        g(32, 4, 3, 3, seed=2),
    )
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["modules_to_save"] == ["conv_in"]
    with pytest.raises(ConversionError, match="conv_in"):
        convert(src, "diffusers", tmp_path / "d.safetensors")
