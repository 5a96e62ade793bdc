"""The same command run twice writes the same bytes: convert, merge, combine, extract and resize.

Every case runs its command through the CLI (`loratool ... --quiet`) twice, in separate
invocations, into two outputs at different paths with different names, with the global torch and
Python RNGs left in different states before each run. The two outputs must be byte-identical: a
file's bytes, or for a directory output (a PEFT adapter dir, an HF model dir, a diffusers folder) the
same relative file names and every file's bytes. Neither output may carry its own path or name in its
bytes, and nothing may be left beside it. The literal same command line (same DEST) again with
--force must rewrite the same bytes too.

In-process runs cannot see what changes between processes, above all the order of sets and dicts
of strings, which Python's per-process hash salt decides; test_runs_in_other_processes_match runs
every case again in two fresh interpreters with different PYTHONHASHSEED values and compares those
outputs with the in-process ones.

Nothing here is masked: a timestamp, a temporary name, an unseeded RNG or an unordered walk in an
output is a bug in loratool, not something to normalise away. The extract cases run with
`sketch_every_module` (conftest.py) so the randomized SVD, whose seeds are the thing to check, is the
path taken; a spy confirms it was.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import loratool.commands.extract
from loratool.archs import get_architecture
from loratool.cli import main

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from tiny_models import clip_text_model, flux_transformer, sd15_unet, single_file
from transformers import LlamaConfig, LlamaForCausalLM

pytestmark = pytest.mark.usefixtures("sketch_every_module")

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures"
KOHYA_SD15 = FIXTURES / "kohya_sd15.safetensors"
DIFFUSERS_SD15 = FIXTURES / "diffusers_sd15.safetensors"
KOHYA_FLUX = FIXTURES / "kohya_flux.safetensors"
FLUX_DIFFUSERS = FIXTURES / "flux_diffusers.safetensors"
LOHA = FIXTURES / "lycoris_loha.safetensors"
PEFT_LLAMA = FIXTURES / "peft_llama"

# The two runs of a case write to <tmp>/<RUN_DIRS[i]>/<OUT_NAMES[i]><suffix>: different folders and
# different names, neither of which may show up in what is written.
RUN_DIRS = ("run-dir-qzx", "run-dir-vkw")
OUT_NAMES = ("first-out-jyp", "second-out-hfm")


# ---------------------------------------------------------------------------------------------------
# inputs: a narrow SD1.5 checkpoint and a fine-tune of it, tiny Llama dirs, a UNet-only kohya LoRA
# ---------------------------------------------------------------------------------------------------


def tuned_copy(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Every weight matrix (linear, conv, embedding) plus a change of rank 1 to 4 (in turn) and a little
    noise, so that --dynamic picks different ranks; the rest kept."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (key, w) in enumerate(state.items()):
        if not (key.endswith("weight") and w.ndim >= 2 and w.is_floating_point()):
            out[key] = w.clone()
            continue
        rows, cols, rank = w.shape[0], w[0].numel(), 1 + i % 4
        change = torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g)
        change += 0.05 * torch.randn(rows, cols, generator=g)
        out[key] = (w + 0.1 * change.reshape(w.shape) * (float(w.norm()) / float(change.norm()))).contiguous()
    return out


def llama(hidden: int, intermediate: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


@dataclass
class Inputs:
    sd1: Path  # single-file SD1.5 base (LDM keys), with metadata and tensors no LoRA touches
    sd1_tuned: Path  # a fine-tune of it
    unet_lora: Path  # kohya_sd15's UNet modules only: one component, so PEFT can hold it
    llama_dir: Path  # the tiny Llama peft_llama was trained on, save_pretrained in one file
    llama_sharded: Path  # the same model in several shards with an index
    flux_folder: Path  # a diffusers folder: model_index.json and transformer/
    wide_base: Path  # a wider Llama (k/v 64 x 128: big enough for the randomized SVD at rank 4)
    wide_tuned: Path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    return make_inputs(tmp_path_factory.mktemp("inputs"))


def make_inputs(root: Path) -> Inputs:
    """The inputs under root (the golden corpus, tests/golden, builds them too)."""
    from tiny_models import llama as peft_llama_model

    torch.manual_seed(0)
    sd1 = single_file(get_architecture("sd1"), {"unet": sd15_unet(), "text_encoder": clip_text_model()})
    sd1["first_stage_model.decoder.conv_in.weight"] = torch.randn(4, 4, 3, 3)
    sd1["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(8)[None]
    save_file(sd1, root / "sd1.safetensors", {"modelspec.title": "tiny sd1", "format": "pt"})
    save_file(tuned_copy(sd1, seed=1), root / "sd1_tuned.safetensors", {"format": "pt"})

    unet_only = {k: v for k, v in load_file(KOHYA_SD15).items() if k.startswith("lora_unet_")}
    with safe_open(KOHYA_SD15, "pt") as f:  # its ss_* metadata tells sd1 from sd2
        save_file(unet_only, root / "unet_lora.safetensors", f.metadata())

    model = peft_llama_model().eval()
    model.save_pretrained(root / "llama")
    model.save_pretrained(root / "llama_sharded", max_shard_size="20KB")
    assert (root / "llama_sharded" / "model.safetensors.index.json").exists()

    flux = root / "flux"
    flux_transformer().save_pretrained(flux / "transformer")
    index = {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}
    (flux / "model_index.json").write_text(json.dumps(index))

    wide = llama(hidden=128, intermediate=320)
    wide.save_pretrained(root / "wide_base")
    with torch.no_grad():
        for key, value in tuned_copy(wide.state_dict(), seed=2).items():
            wide.state_dict()[key].copy_(value)
    wide.save_pretrained(root / "wide_tuned")
    return Inputs(
        root / "sd1.safetensors",
        root / "sd1_tuned.safetensors",
        root / "unet_lora.safetensors",
        root / "llama",
        root / "llama_sharded",
        flux,
        root / "wide_base",
        root / "wide_tuned",
    )


# ---------------------------------------------------------------------------------------------------
# the cases: (command line without -o, output suffix: ".safetensors" for a file, "" for a directory)
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    args: Callable[[Inputs], list[str]]
    suffix: str = ".safetensors"
    randomized: bool = False  # extract: the randomized SVD must have run


def cli(*parts: object) -> Callable[[Inputs], list[str]]:
    """A command line whose parts may be attribute names of Inputs, written as `@name`."""
    return lambda i: [str(getattr(i, p[1:])) if isinstance(p, str) and p.startswith("@") else str(p) for p in parts]


CASES: dict[str, Case] = {
    # convert
    "convert-kohya-to-diffusers": Case(cli("convert", KOHYA_SD15, "--to", "diffusers")),
    "convert-flux-kohya-to-diffusers": Case(cli("convert", KOHYA_FLUX, "--to", "diffusers")),  # fused qkv split
    "convert-kohya-to-peft": Case(cli("convert", "@unet_lora", "--to", "peft"), suffix=""),
    "convert-peft-to-kohya": Case(cli("convert", PEFT_LLAMA, "--to", "kohya")),
    "convert-loha-to-kohya": Case(cli("convert", LOHA, "--to", "kohya")),
    # merge
    "merge-one-lora": Case(cli("merge", "@sd1", KOHYA_SD15, "-w", 0.8)),
    "merge-two-loras": Case(cli("merge", "@sd1", KOHYA_SD15, DIFFUSERS_SD15, "-w", 0.7, "-w", -0.3)),
    "merge-fp16": Case(cli("merge", "@sd1", KOHYA_SD15, LOHA, "-w", 0.5, "-w", 0.25, "--dtype", "fp16")),
    "merge-hf-dir": Case(cli("merge", "@llama_dir", PEFT_LLAMA), suffix=""),
    "merge-hf-dir-reshard": Case(cli("merge", "@llama_dir", PEFT_LLAMA, "--shard-size", "20KB"), suffix=""),
    "merge-hf-sharded-dir": Case(cli("merge", "@llama_sharded", PEFT_LLAMA, "-w", -0.5), suffix=""),
    "merge-diffusers-folder": Case(  # kohya's fused qkv / linear1 onto split to_q/to_k/to_v; no CLIP here
        cli("merge", "@flux_folder", FLUX_DIFFUSERS, KOHYA_FLUX, "-w", 0.6, "-w", 0.4, "--allow-unmatched"), suffix=""
    ),
    # combine
    "combine-exact": Case(cli("combine", KOHYA_SD15, DIFFUSERS_SD15, "-w", 0.7, "-w", -0.3)),
    "combine-rank": Case(cli("combine", KOHYA_SD15, DIFFUSERS_SD15, "-w", 0.7, "-w", -0.3, "--rank", 3)),
    "combine-flux-rank-to-diffusers": Case(
        cli("combine", KOHYA_FLUX, FLUX_DIFFUSERS, "--rank", 4, "--to", "diffusers")
    ),
    "combine-peft-rank": Case(cli("combine", PEFT_LLAMA, PEFT_LLAMA, "-w", 0.5, "-w", 0.2, "--rank", 2), suffix=""),
    # extract (randomized SVD: sketch_every_module)
    "extract-rank": Case(cli("extract", "@sd1", "@sd1_tuned", "--rank", 2), randomized=True),
    "extract-dynamic": Case(
        cli("extract", "@sd1", "@sd1_tuned", "--dynamic", "fro:0.9", "--max-rank", 4), randomized=True
    ),
    "extract-options": Case(
        cli("extract", "@sd1", "@sd1_tuned", "--rank", 2, "--conv-rank", 1, "--alpha", 1, "--clamp-quantile", 0.99),
        randomized=True,
    ),
    "extract-to-diffusers": Case(
        cli("extract", "@sd1", "@sd1_tuned", "--rank", 2, "--to", "diffusers"), randomized=True
    ),
    "extract-peft-rank": Case(cli("extract", "@wide_base", "@wide_tuned", "--rank", 4), suffix="", randomized=True),
    "extract-peft-dynamic": Case(
        cli("extract", "@wide_base", "@wide_tuned", "--dynamic", "fro:0.9", "--max-rank", 4),
        suffix="",
        randomized=True,
    ),
    # resize
    "resize-rank": Case(cli("resize", KOHYA_SD15, "--rank", 2)),
    "resize-dynamic": Case(cli("resize", KOHYA_SD15, "--dynamic", "fro:0.9")),
    "resize-peft-rank": Case(cli("resize", PEFT_LLAMA, "--rank", 2), suffix=""),
    "resize-peft-dynamic": Case(cli("resize", PEFT_LLAMA, "--dynamic", "ratio:2"), suffix=""),
}


# ---------------------------------------------------------------------------------------------------
# running and comparing
# ---------------------------------------------------------------------------------------------------


def dest_for(root: Path, run: int, case: Case) -> Path:
    folder = root / RUN_DIRS[run]
    folder.mkdir(parents=True, exist_ok=True)
    return folder / (OUT_NAMES[run] + case.suffix)


def run_cli(args: list[str], dest: Path, salt: int) -> None:
    torch.manual_seed(1000 + salt)  # the global RNG states must not matter
    torch.randn(salt + 1)
    random.seed(salt)
    result = CliRunner().invoke(main, [*args, "-o", str(dest), "--quiet"])
    assert result.exit_code == 0, f"{' '.join(args)}: exit {result.exit_code}\n{result.output}"


def snapshot(path: Path) -> dict[str, bytes]:
    """A file's bytes (under the name ""), or every file under a directory by relative path."""
    if path.is_file():
        return {"": path.read_bytes()}
    assert path.is_dir(), f"{path} was not written"
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in files}


def safetensors_parts(data: bytes) -> tuple[dict, dict[str, bytes]] | None:
    """(header, tensor name -> raw bytes) of a safetensors file, or None when it is not one."""
    try:
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + size])
    except (struct.error, ValueError):
        return None
    body = data[8 + size :]
    raw = {k: body[v["data_offsets"][0] : v["data_offsets"][1]] for k, v in header.items() if k != "__metadata__"}
    return header, raw


def difference(a: bytes, b: bytes) -> str:
    """Where two outputs differ, in words: metadata entries and tensors for safetensors, else bytes."""
    parts_a, parts_b = safetensors_parts(a), safetensors_parts(b)
    if parts_a is not None and parts_b is not None:
        (header_a, raw_a), (header_b, raw_b) = parts_a, parts_b
        meta_a, meta_b = header_a.get("__metadata__", {}), header_b.get("__metadata__", {})
        keys = sorted(meta_a.keys() | meta_b.keys())
        notes = [
            f"metadata {k}: {meta_a.get(k)!r} vs {meta_b.get(k)!r}" for k in keys if meta_a.get(k) != meta_b.get(k)
        ]
        if list(raw_a) != list(raw_b):
            notes.append(f"tensor order or names differ: {list(raw_a)[:5]}... vs {list(raw_b)[:5]}...")
        notes += [f"tensor {k}: other bytes" for k in raw_a if k in raw_b and raw_a[k] != raw_b[k]][:10]
        if notes:
            return "; ".join(notes)
    offset = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    at = slice(offset, offset + 60)
    return f"sizes {len(a)} vs {len(b)}, first difference at byte {offset}: {a[at]!r} vs {b[at]!r}"


def assert_identical(first: dict[str, bytes], second: dict[str, bytes], what: str) -> None:
    # Plain raises, not asserts: pytest's explanation of two unequal multi-MB byte strings (a
    # character diff of their reprs) can run for many minutes; `difference` says where instead.
    if not first:
        raise AssertionError(f"{what}: nothing was written")
    if list(first) != list(second):
        raise AssertionError(f"{what}: other files: {list(first)} vs {list(second)}")
    for name, data in first.items():
        if data != second[name]:
            raise AssertionError(f"{what}: {name or 'the file'} differs: {difference(data, second[name])}")


def assert_no_path_leak(outputs: dict[str, bytes], dest: Path) -> None:
    for token in (dest.name, dest.stem, dest.parent.name):
        for name, data in outputs.items():
            assert token.encode() not in data, f"{name or 'the output'} records its own path ({token!r})"


@pytest.fixture
def randomized_calls(monkeypatch) -> list[int]:
    """The sweep count of every randomized_svd extract calls: 0 means it fell back to an exact SVD."""
    calls: list[int] = []
    original = loratool.commands.extract.randomized_svd

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append(result.sweeps)
        return result

    monkeypatch.setattr(loratool.commands.extract, "randomized_svd", spy)
    return calls


@pytest.fixture(scope="module")
def in_process(inputs, tmp_path_factory) -> Callable[[str], tuple[dict[str, bytes], Path]]:
    """Each case's first in-process output (snapshot and path), run once and shared."""
    cache: dict[str, tuple[dict[str, bytes], Path]] = {}

    def get(name: str) -> tuple[dict[str, bytes], Path]:
        if name not in cache:
            case = CASES[name]
            dest = dest_for(tmp_path_factory.mktemp(name), 0, case)
            run_cli(case.args(inputs), dest, salt=0)
            cache[name] = snapshot(dest), dest
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_two_runs_write_the_same_bytes(name, inputs, in_process, randomized_calls, tmp_path):
    case = CASES[name]
    first, first_dest = in_process(name)
    randomized_calls.clear()
    second_dest = dest_for(tmp_path, 1, case)
    run_cli(case.args(inputs), second_dest, salt=1)
    second = snapshot(second_dest)
    if case.randomized:
        assert any(sweeps > 0 for sweeps in randomized_calls), "the randomized SVD never ran: nothing checked its seeds"
    assert_no_path_leak(first, first_dest)
    assert_no_path_leak(second, second_dest)
    assert_identical(first, second, name)
    for dest in (first_dest, second_dest):  # no temporary file or folder left beside the output
        assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]


@pytest.mark.parametrize("name", list(CASES))
def test_the_same_command_again_with_force_rewrites_the_same_bytes(name, inputs, in_process, tmp_path):
    """The literal same command line (same DEST) a second time, with --force to replace DEST."""
    case = CASES[name]
    first, _ = in_process(name)
    dest = dest_for(tmp_path, 0, case)
    run_cli(case.args(inputs), dest, salt=2)
    before = snapshot(dest)
    run_cli([*case.args(inputs), "--force"], dest, salt=3)
    again = snapshot(dest)
    assert_identical(before, again, f"{name} --force")
    assert_identical(first, again, f"{name} --force, against the first run")
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]


# ---------------------------------------------------------------------------------------------------
# other processes: the hash salt of str (set and dict-of-set orders) must not matter either
# ---------------------------------------------------------------------------------------------------

SUBPROCESS_SCRIPT = """
import json, sys
from click.testing import CliRunner
from loratool.cli import main
from loratool.ops import svd
svd.EXACT_BELOW = 0  # as sketch_every_module does
for args in json.loads(sys.argv[1]):
    result = CliRunner().invoke(main, [*args, "--quiet"])
    if result.exit_code:
        sys.exit(f"{args}: exit {result.exit_code}: {result.output}")
"""


def test_runs_in_other_processes_match(inputs, in_process, tmp_path):
    """Every case in two fresh interpreters (PYTHONHASHSEED 1 and 2), each output at its own path."""
    for seed in (1, 2):
        batch, dests = [], {}
        for name, case in CASES.items():
            dests[name] = dest_for(tmp_path / f"hashseed-{seed}" / name, seed - 1, case)
            batch.append([*case.args(inputs), "-o", str(dests[name])])
        # The same thread count as this process: "run twice" means on the same machine and settings
        # (torch's float sums may group differently with another number of threads).
        env = {**os.environ, "PYTHONHASHSEED": str(seed), "OMP_NUM_THREADS": str(torch.get_num_threads())}
        command = [sys.executable, "-c", SUBPROCESS_SCRIPT, json.dumps(batch)]
        proc = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        for name in CASES:
            reference, _ = in_process(name)
            assert_identical(reference, snapshot(dests[name]), f"{name} (PYTHONHASHSEED={seed})")


def test_a_different_command_is_detected(inputs, in_process, tmp_path):
    """The comparison is not vacuous: a merge at another weight gives other bytes, and says where."""
    first, _ = in_process("merge-one-lora")  # -w 0.8
    dest = dest_for(tmp_path, 1, CASES["merge-one-lora"])
    run_cli(cli("merge", "@sd1", KOHYA_SD15, "-w", 0.81)(inputs), dest, salt=1)
    with pytest.raises(AssertionError, match=r"the file differs: tensor \S+: other bytes"):
        assert_identical(first, snapshot(dest), "merge")
