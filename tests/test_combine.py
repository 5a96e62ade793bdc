"""`loratool combine`: one LoRA whose update is the weighted sum of several.

Exact mode must give every canonical module sum_i w_i * dW_i (tests/deltas.py computes dW from
each file's factors, whatever its layout); rank mode must give the best rank-R approximation of
that sum (checked against a dense SVD here, which the implementation never forms); and combining
then merging must equal merging each LoRA in turn.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from deltas import deltas
from safetensors.torch import load_file
from test_inspect_base import bases

import loratool
from loratool.cli import main
from loratool.commands.combine import COMBINED_KEY, combine
from loratool.errors import ConversionError, OutputError
from loratool.io.safetensors_file import SafetensorsFile

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
KOHYA = FIXTURES / "kohya_sd15.safetensors"
DIFFUSERS = FIXTURES / "diffusers_sd15.safetensors"
FLUX_KOHYA = FIXTURES / "kohya_flux.safetensors"  # fused qkv / linear1
FLUX_SPLIT = FIXTURES / "flux_diffusers.safetensors"  # the same modules split into to_q/to_k/to_v


def weighted_sum(parts: list[tuple[Path, float]]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path, w in parts:
        for target, d in deltas(path).items():
            out[target] = out[target] + w * d if target in out else w * d
    return out


def assert_close_deltas(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert got.keys() == want.keys()
    for target, value in want.items():
        torch.testing.assert_close(got[target], value, rtol=1e-5, atol=atol, msg=target)


@pytest.mark.parametrize("to", ["kohya", "diffusers"])
@pytest.mark.parametrize(
    ("a", "b"), [(KOHYA, DIFFUSERS), (FLUX_KOHYA, FLUX_SPLIT)], ids=["sd15-kohya+diffusers", "flux-fused+split"]
)
def test_exact_combination_is_the_weighted_sum(tmp_path, a, b, to):
    out = tmp_path / "combined.safetensors"
    report = combine([a, b], out, weights=[0.7, -0.3], to=to)
    assert report.modules_shared > 0
    assert_close_deltas(deltas(out), weighted_sum([(a, 0.7), (b, -0.3)]))


def test_shared_modules_have_summed_rank_and_alpha_equal_to_it(tmp_path):
    out = tmp_path / "combined.safetensors"
    combine([KOHYA, KOHYA], out, weights=[0.5, 0.25])
    with loratool.load_adapter(out) as combined, loratool.load_adapter(KOHYA) as single:
        for name, module in combined.modules.items():
            assert module.rank == 2 * single.modules[name].rank
            assert module.alpha == module.rank and module.scale == 1.0
            assert module.dtypes["up"] == "F32"  # scaling fp16 factors would round them
    assert_close_deltas(deltas(out), weighted_sum([(KOHYA, 0.75)]))


def test_best_rank_matches_the_truncated_svd_of_the_sum(tmp_path):
    out = tmp_path / "r2.safetensors"
    rank = 2
    combine([KOHYA, DIFFUSERS], out, weights=[1.0, 0.5], rank=rank)
    want = weighted_sum([(KOHYA, 1.0), (DIFFUSERS, 0.5)])
    got = deltas(out)
    assert got.keys() == want.keys()
    with loratool.load_adapter(out) as adapter:
        assert max(m.rank for m in adapter.modules.values()) <= rank
    for target, dense in want.items():
        s = torch.linalg.svdvals(dense.double())
        optimal = float(s[rank:].square().sum().sqrt())
        error = float((got[target].double() - dense.double()).norm())
        assert error <= optimal * (1 + 1e-3) + 1e-6, target


def test_rank_at_or_above_the_total_is_exact(tmp_path):
    out = tmp_path / "big.safetensors"
    combine([KOHYA, DIFFUSERS], out, rank=10_000)
    assert_close_deltas(deltas(out), weighted_sum([(KOHYA, 1.0), (DIFFUSERS, 1.0)]))


def test_modules_in_one_lora_only_pass_through_byte_for_byte(tmp_path):
    out = tmp_path / "combined.safetensors"
    combine([KOHYA, DIFFUSERS], out, to="kohya")
    src, got = SafetensorsFile(KOHYA), SafetensorsFile(out)
    down = ".lora_down.weight"
    kept = {k[: -len(down)] for k in src if k.endswith(down) and got.info(k).shape == src.info(k).shape}
    only_first = [k for k in src if k.split(".", 1)[0] in kept]
    assert len(only_first) > 10
    for key in only_first:
        assert got.read_bytes(key) == src.read_bytes(key), key


def test_combine_then_merge_equals_merging_each_in_turn(tmp_path):
    base = bases(tmp_path)["sd1"]
    combined, one, two, via = (
        tmp_path / n for n in ("c.safetensors", "1.safetensors", "2.safetensors", "v.safetensors")
    )
    combine([KOHYA, DIFFUSERS], combined, weights=[0.7, -0.3])
    loratool.merge(base, [KOHYA], one, weights=[0.7], device="cpu")
    loratool.merge(one, [DIFFUSERS], two, weights=[-0.3], device="cpu")
    loratool.merge(base, [combined], via, device="cpu")
    want, got = load_file(two), load_file(via)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=key)


def test_peft_adapters_combine_into_a_peft_dir(tmp_path):
    src = FIXTURES / "peft_llama"
    out = tmp_path / "combined"
    combine([src, src], out, weights=[0.5, 0.25], to="peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert_close_deltas(deltas(out), weighted_sum([(src, 0.75)]))


def test_metadata_records_the_inputs(tmp_path):
    out = tmp_path / "combined.safetensors"
    combine([KOHYA, DIFFUSERS], out, weights=[1.0, 0.5], to="kohya")
    record = json.loads(SafetensorsFile(out).metadata[COMBINED_KEY])
    assert record == {"loras": [KOHYA.name, DIFFUSERS.name], "weights": [1.0, 0.5], "rank": None}


def test_default_layout_is_the_first_loras(tmp_path):
    out = tmp_path / "combined.safetensors"
    report = combine([DIFFUSERS, KOHYA], out)
    assert report.target == "diffusers"
    assert all(k.startswith(("unet.", "text_encoder.")) for k in SafetensorsFile(out))


def test_refusals(tmp_path):
    out = tmp_path / "combined.safetensors"
    with pytest.raises(ConversionError, match="different models"):
        combine([KOHYA, FLUX_KOHYA], out)
    with pytest.raises(ConversionError, match="do not add up"):
        combine([FIXTURES / "lycoris_loha.safetensors", FIXTURES / "lycoris_loha.safetensors"], out)
    with pytest.raises(ConversionError, match="1 weight"):
        combine([KOHYA, DIFFUSERS], out, weights=[1.0])
    with pytest.raises(ConversionError, match="--rank 0"):
        combine([KOHYA, DIFFUSERS], out, rank=0)
    assert not out.exists()
    out.write_bytes(b"keep")
    with pytest.raises(OutputError, match="exists"):
        combine([KOHYA, DIFFUSERS], out)
    assert out.read_bytes() == b"keep"


def test_cli_combine(tmp_path):
    out = tmp_path / "combined.safetensors"
    args = ["combine", str(KOHYA), str(DIFFUSERS), "-w", "0.7", "-w", "-0.3", "--rank", "4", "-o", str(out), "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["rank"] == 4 and data["weights"] == [0.7, -0.3]
    bad = CliRunner().invoke(main, ["combine", str(KOHYA), str(FLUX_KOHYA), "-o", str(tmp_path / "x.safetensors")])
    assert bad.exit_code == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_modules_of_different_widths_are_refused(tmp_path):
    wide = tmp_path / "wide.safetensors"
    tensors = load_file(KOHYA)
    key = "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"
    tensors[key] = torch.cat([tensors[key], tensors[key]], dim=1)
    from safetensors.torch import save_file

    save_file(tensors, wide)
    with pytest.raises(ConversionError, match="are they LoRAs of the same model"):
        combine([KOHYA, wide], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
