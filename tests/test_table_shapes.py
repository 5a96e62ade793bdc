"""Shapes as evidence (issue 25): no module is named under a family whose table widths disagree.

Real-width LoRAs in diffusers layout, a few blocks each so the files stay small: SD3.5 Medium
(width 1536) and HunyuanVideo 1.5 (2048) use Flux.1's diffusers names (3072), HunyuanVideo's
blocks are Flux.1's name for name and width for width. Each is read with every table, and again
as it was before its family had one (the catalog rebuilt without those tables): the file is then
"unknown" with Flux.1 named as the closest candidate and why, and nothing converts it under Flux.1's
names. One module at other widths in an otherwise correct Flux.1 LoRA is a finding on that module
alone, and every command that writes refuses it.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import loratool
from loratool import archs
from loratool.archs import catalog, get_architecture
from loratool.archs import generate as gen
from loratool.errors import ConversionError, ExtractError, MergeError

RANK = 2


def real_width_lora(path: Path, arch: str, pick: Callable[[str], bool], wrong: dict[str, tuple[int, int]] = {}) -> Path:  # noqa: B006
    """A diffusers-layout LoRA on the linear modules of `arch`'s table that `pick` keeps, at the
    table's full-size widths (or the widths `wrong` gives a module)."""
    tensors = {}
    for name, spec in get_architecture(arch).modules.items():
        if spec.type != "linear" or not pick(name):
            continue
        rows, cols = wrong.get(name, spec.shape)
        tensors[f"{name}.lora_A.weight"] = torch.full((RANK, cols), 0.01, dtype=torch.float16)
        tensors[f"{name}.lora_B.weight"] = torch.full((rows, RANK), 0.01, dtype=torch.float16)
    assert tensors
    save_file(tensors, str(path))
    return path


def blocks(count: int, *modules: str, single: bool = False) -> Callable[[str], bool]:
    kind = "single_transformer_blocks" if single else "transformer_blocks"
    pattern = re.compile(rf"transformer\.{kind}\.(\d+)\.({'|'.join(re.escape(m) for m in modules)})$")
    return lambda name: (m := pattern.match(name)) is not None and int(m.group(1)) < count


@contextmanager
def tables_without(*names: str) -> Iterator[None]:
    """Detection as it was before these families had tables: the catalog rebuilt without them."""
    kept = [a for a in gen.committed_tables() if a.name not in names]
    with tempfile.TemporaryDirectory() as folder, pytest.MonkeyPatch.context() as patch:
        path = Path(folder) / "catalog.json"
        path.write_text(catalog.dump(catalog.build(kept)), encoding="utf-8")
        patch.setattr(catalog, "CATALOG", path)
        catalog.get_catalog.cache_clear()
        archs.architectures.cache_clear()
        try:
            yield
        finally:
            catalog.get_catalog.cache_clear()
            archs.architectures.cache_clear()


SD3 = ("sd3", "sd3.5-medium", "sd3.5-large")
SD35_MODULES = ("attn.to_q", "attn.to_k", "attn.add_q_proj", "ff.net.0.proj")


def sd35_pick(name: str) -> bool:
    """Blocks 0-2, and block 20's to_q: Flux.1 has 19 double blocks, SD3.5 Medium 24."""
    return blocks(3, *SD35_MODULES)(name) or name == "transformer.transformer_blocks.20.attn.to_q"


@pytest.fixture(scope="module")
def sd35(tmp_path_factory) -> Path:
    return real_width_lora(tmp_path_factory.mktemp("sd35") / "sd35.safetensors", "sd3.5-medium", sd35_pick)


def errors(report, code: str) -> list:
    return [f for f in report.findings if f.code == code]


def test_sd35_medium_is_read_as_sd3_and_flux_is_ruled_out_by_widths(tmp_path) -> None:
    """On blocks Flux.1 also has, every table with these names ties on names; the widths leave
    SD3 Medium and SD3.5 Medium, whose blocks are the same."""
    lora = real_width_lora(tmp_path / "blocks.safetensors", "sd3.5-medium", blocks(3, *SD35_MODULES))
    report = loratool.inspect(lora, header_only=True)
    assert report.architecture in ("sd3", "sd3.5-medium"), report.architecture_reason
    assert "ambiguous between sd3, sd3.5-medium" in report.architecture_reason
    assert re.search(r"flux1, chroma.* have these names at other widths", report.architecture_reason)
    assert not errors(report, "table-mismatch")


def test_before_its_table_sd35_medium_is_unknown_not_flux(sd35, tmp_path) -> None:
    assert loratool.inspect(sd35, header_only=True).architecture in ("sd3", "sd3.5-medium")
    with tables_without(*SD3, "hunyuan_video15"):  # as it was: 54 blocks of 2048 came later
        report = loratool.inspect(sd35, header_only=True)
        assert report.architecture is None, report.architecture_reason
        (unknown,) = errors(report, "unknown-architecture")
        # the closest candidate, and why it was rejected: the widths of a named module
        assert "flux1 (Flux.1) knows 12 of 13 module names, but 12 of the 12 have other widths" in unknown.message
        assert "1536x1536" in unknown.message and "3072x3072" in unknown.message
        assert not errors(report, "unknown-key")  # no table to be unknown to
        assert not errors(report, "table-mismatch")

        for to in ("kohya", "comfyui"):  # no family to name the modules by: nothing is written
            with pytest.raises(ConversionError, match="no known architecture fits both names and shapes"):
                loratool.convert(sd35, to, tmp_path / f"out_{to}.safetensors")
            assert not (tmp_path / f"out_{to}.safetensors").exists()

        # --arch names the family, never the widths: the writer refuses, naming module and shapes
        dest = tmp_path / "kohya.safetensors"
        message = r"factors give a 1536x1536 update, but flux1 \(Flux.1\) has 3072x3072"
        with pytest.raises(ConversionError, match=message):
            loratool.convert(sd35, "kohya", dest, arch="flux1")
        assert not dest.exists()


def test_hunyuan_video15_widths_rule_out_flux_with_or_without_its_table(tmp_path) -> None:
    lora = real_width_lora(
        tmp_path / "hv15.safetensors", "hunyuan_video15", blocks(2, "attn.to_q", "attn.add_q_proj", "ff.net.0.proj")
    )
    report = loratool.inspect(lora, header_only=True)
    assert report.architecture == "hunyuan_video15", report.architecture_reason
    assert not errors(report, "table-mismatch")
    with tables_without("hunyuan_video15"):
        report = loratool.inspect(lora, header_only=True)
        assert report.architecture is None, report.architecture_reason
        (unknown,) = errors(report, "unknown-architecture")
        assert "flux1" in unknown.message and "2048x2048" in unknown.message and "3072x3072" in unknown.message
        with pytest.raises(ConversionError, match="2048x2048"):
            loratool.convert(lora, "comfyui", tmp_path / "comfy.safetensors", arch="flux1")


def test_hunyuan_video_blocks_have_flux_widths_so_its_names_decide(tmp_path) -> None:
    """HunyuanVideo's double and single blocks are Flux.1's at the same widths: its 40th single
    block (Flux.1 has 38) names it; without its table that module is unknown to Flux.1 and every
    writer refuses the file, as before."""
    kept = {
        "transformer.transformer_blocks.0.attn.to_q",
        "transformer.single_transformer_blocks.0.proj_mlp",
        "transformer.single_transformer_blocks.39.proj_mlp",
    }
    lora = real_width_lora(tmp_path / "hv.safetensors", "hunyuan_video", kept.__contains__)
    report = loratool.inspect(lora, header_only=True)
    assert report.architecture == "hunyuan_video", report.architecture_reason
    assert not errors(report, "table-mismatch")
    with tables_without("hunyuan_video", "hunyuan_video15"):
        report = loratool.inspect(lora, header_only=True)
        assert report.architecture == "flux1", report.architecture_reason
        assert [f.module for f in errors(report, "unknown-key")] == [
            "transformer.single_transformer_blocks.39.proj_mlp"
        ]
        assert not errors(report, "table-mismatch")  # the widths are Flux.1's: names are the evidence
        with pytest.raises(ConversionError, match=r"single_transformer_blocks\.39"):
            loratool.convert(lora, "kohya", tmp_path / "kohya.safetensors")


FLUX_MODULES = ("attn.to_q", "attn.to_k", "attn.add_q_proj", "ff.net.0.proj")
WRONG = "transformer.transformer_blocks.1.attn.to_k"


@pytest.fixture(scope="module")
def flux_one_wrong(tmp_path_factory) -> Path:
    """A real-width Flux.1 LoRA on blocks 0-1 with one module at other widths (1536 inputs)."""
    path = tmp_path_factory.mktemp("flux") / "flux.safetensors"
    return real_width_lora(path, "flux1", blocks(2, *FLUX_MODULES), {WRONG: (3072, 1536)})


def test_one_module_at_other_widths_is_a_finding_on_that_module_alone(flux_one_wrong) -> None:
    for header_only in (True, False):
        report = loratool.inspect(flux_one_wrong, header_only=header_only)
        assert report.architecture == "flux1", report.architecture_reason
        (found,) = errors(report, "table-mismatch")
        assert found.module == WRONG and found.severity == "error"
        assert "3072x1536" in found.message and "3072x3072" in found.message
        assert [f for f in report.findings if f.severity == "error"] == [found]


def test_every_writer_refuses_the_module_at_other_widths(flux_one_wrong, tmp_path) -> None:
    for to in ("kohya", "comfyui", "diffusers", "peft"):
        dest = tmp_path / f"out_{to}"
        with pytest.raises(ConversionError, match=rf"{re.escape(WRONG)}: factors give a 3072x1536 update"):
            loratool.convert(flux_one_wrong, to, dest)
        assert not dest.exists()
    with pytest.raises(ConversionError, match=re.escape(WRONG)):
        loratool.resize(flux_one_wrong, tmp_path / "resized.safetensors", rank=1)


@pytest.fixture(scope="module")
def block1_base(tmp_path_factory) -> Path:
    """A base holding block 1's to_q and to_k at Flux.1's widths (diffusers names)."""
    base = tmp_path_factory.mktemp("base") / "base.safetensors"
    weights = {
        f"transformer_blocks.1.attn.{m}.weight": torch.zeros(3072, 3072, dtype=torch.bfloat16) for m in ("to_q", "to_k")
    }
    save_file(weights, str(base))
    return base


def test_the_finding_stands_with_a_base(flux_one_wrong, block1_base) -> None:
    report = loratool.inspect(flux_one_wrong, base=block1_base)
    (found,) = errors(report, "table-mismatch")
    assert found.module == WRONG and "3072x1536" in found.message and "3072x3072" in found.message


def test_merge_refuses_the_module_at_other_widths(flux_one_wrong, block1_base, tmp_path) -> None:
    """The LoRA is refused before anything is computed, naming the module and both shapes."""
    dest = tmp_path / "merged.safetensors"
    with pytest.raises((MergeError, ConversionError), match=r"3072x1536.*3072x3072|3072x3072.*3072x1536"):
        loratool.merge(block1_base, [flux_one_wrong], dest)
    assert not dest.exists()


def test_extract_refuses_a_checkpoint_at_other_widths_than_its_table(tmp_path) -> None:
    """A fine-tune of a model whose names are Flux.1's but whose widths are not (SD3.5 Medium's
    1536, before SD3 had a table): the tables that know its names (Flux.1's, Qwen-Image's) are all
    3072 wide, and no LoRA is written under their names."""
    weights = {
        f"transformer_blocks.{i}.attn.to_q.weight": torch.zeros(1536, 1536, dtype=torch.bfloat16) for i in (0, 1)
    }
    base, tuned = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"
    save_file(weights, str(base))
    save_file({k: v + 0.01 for k, v in weights.items()}, str(tuned))
    dest = tmp_path / "lora.safetensors"
    with (
        tables_without(*SD3),
        pytest.raises(ExtractError, match=r"1536x1536 weight where \S+ \(.+\) has 3072x3072"),
    ):
        loratool.extract(base, tuned, dest, rank=1)
    assert not dest.exists()


def test_reduced_test_models_keep_their_family() -> None:
    """Widths far below the table's (models built from small configs) are not compared: the fixture
    LoRAs keep their families and get no table findings."""
    fixtures = Path(__file__).resolve().parents[1] / "fixtures"
    for name, arch in (("kohya_flux.safetensors", "flux1"), ("kohya_sdxl.safetensors", "sdxl")):
        report = loratool.inspect(fixtures / name, header_only=True)
        assert report.architecture == arch
        assert not errors(report, "table-mismatch")


def test_the_width_the_factors_do_not_fix_is_the_kinds_own() -> None:
    from loratool.archs import fit
    from loratool.kinds.base import ANY

    assert fit.ANY == ANY
