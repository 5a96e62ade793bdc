"""merge on HF model directories and the PEFT adapters PEFT itself saved: ours equals merge_and_unload.

Bases are tiny Llama, GPT-2 (Conv1D, fan_in_fan_out, lm_head tied to wte) and Qwen2 (biased q/k/v)
models saved with `save_pretrained`; adapters come from `get_peft_model(...).save_pretrained` with
plain, rank/alpha pattern, rsLoRA, DoRA, embedding and lora_bias configs. The file proves that:

- `loratool.merge(base_dir, [adapter_dir], dest)` gives PEFT's `merge_and_unload()` weights (fp32:
  max abs diff <= 1e-6; bf16: within one bf16 ulp element-wise, taken at the largest of |W|, the
  delta and both results since PEFT rounds the delta to bf16 first, and within half an ulp of the
  fp32 merge of the same weights: computed in fp32, cast once), and DEST loads with
  `AutoModelForCausalLM.from_pretrained` (no missing or unexpected keys) with the merged logits;
- DEST mirrors the base: same weight files, keys, key order, dtypes, header metadata and shards
  (a valid `model.safetensors.index.json`), config files copied, and every tensor no LoRA touches
  byte for byte the base's; `shard_size=` re-shards a directory base;
- several LoRAs at weights 0.7 and -0.3 add 0.7 * d1 - 0.3 * d2, and merging a LoRA at +1 then at
  -1 gives the base back up to fp32 rounding;
- `dtype="bf16"` / `"fp16"` makes every float tensor that dtype, equal to the fp32 merge cast once;
- `loratool merge ... -w 0.5 --device cpu -q --json` exits 0 and reports the matched modules; an
  existing DEST or an adapter for another model is one error line and exit 2, nothing written.
"""

from __future__ import annotations

import copy
import json
import re
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import loratool
from loratool.cli import main
from loratool.errors import LoratoolError, MergeError

pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

WRAP = "base_model.model."
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
FP32_ATOL = 1e-6
LOGITS_ATOL = 1e-5
BF16_DORA_ULPS = 8  # PEFT's own bf16 DoRA merge against ours (which is within half an ulp of the fp32 merge)
BF16_LOGITS_RTOL = 0.02  # of the largest logit: bf16 logits carry 8 significant bits
SHARD = "20KB"  # the tiny models are ~90 KB: save_pretrained writes several shards
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


# ---------------------------------------------------------------------------------------------------
# tiny models, their saved bases, and the adapters PEFT makes on them
# ---------------------------------------------------------------------------------------------------


def tiny_llama() -> torch.nn.Module:
    from tiny_models import llama

    return llama().eval()  # seeds torch itself


def tiny_gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def tiny_qwen2() -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(config).eval()


MODELS: dict[str, Callable[[], torch.nn.Module]] = {"llama": tiny_llama, "gpt2": tiny_gpt2, "qwen2": tiny_qwen2}

# case -> (model, dtype, LoraConfig fields, save_pretrained options for the adapter)
CASES: dict[str, tuple[str, torch.dtype, dict, dict]] = {
    "llama-plain": ("llama", torch.float32, dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS), {}),
    "llama-patterns": (
        "llama",
        torch.float32,
        dict(
            r=4,
            lora_alpha=8,
            target_modules=LLAMA_TARGETS,
            rank_pattern={"layers.1.self_attn.q_proj": 6, "down_proj": 2},
            alpha_pattern={"o_proj": 32, "v_proj": 0.5},
        ),
        {},
    ),
    "llama-rslora": (
        "llama",
        torch.float32,
        dict(r=3, lora_alpha=8, target_modules=LLAMA_TARGETS, use_rslora=True, rank_pattern={"v_proj": 5}),
        {},
    ),
    "llama-dora": ("llama", torch.float32, dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, use_dora=True), {}),
    # PEFT's default here also saves embed_tokens' base weight beside the adapter
    "llama-embedding": (
        "llama",
        torch.float32,
        dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "v_proj"]),
        {},
    ),
    "gpt2-plain": (
        "gpt2",
        torch.float32,
        dict(r=4, lora_alpha=8, target_modules=GPT2_TARGETS, fan_in_fan_out=True),
        {},
    ),
    "gpt2-patterns": (
        "gpt2",
        torch.float32,
        dict(
            r=4,
            lora_alpha=8,
            target_modules=GPT2_TARGETS,
            fan_in_fan_out=True,
            rank_pattern={"h.1.attn.c_proj": 6, "c_fc": 3},
            alpha_pattern={"c_attn": 5, "h.0.mlp.c_proj": 0.1},
        ),
        {},
    ),
    "gpt2-rslora": (
        "gpt2",
        torch.float32,
        dict(r=3, lora_alpha=8, target_modules=GPT2_TARGETS, fan_in_fan_out=True, use_rslora=True),
        {},
    ),
    "gpt2-dora": (
        "gpt2",
        torch.float32,
        dict(r=4, lora_alpha=8, target_modules=GPT2_TARGETS, fan_in_fan_out=True, use_dora=True),
        {},
    ),
    # wte is tied to lm_head: the file holds wte only, and the merged wte is the merged lm_head too
    "gpt2-embedding": (
        "gpt2",
        torch.float32,
        dict(r=4, lora_alpha=8, target_modules=["wte", "c_attn"], fan_in_fan_out=True),
        {"save_embedding_layers": False},
    ),
    "gpt2-bias": (
        "gpt2",
        torch.float32,
        dict(r=4, lora_alpha=8, target_modules=GPT2_TARGETS, fan_in_fan_out=True, lora_bias=True),
        {},
    ),
    "qwen2-plain": ("qwen2", torch.float32, dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS), {}),
    # only q/k/v have a bias in Qwen2: lora_bias goes there
    "qwen2-bias": (
        "qwen2",
        torch.float32,
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True),
        {},
    ),
    "qwen2-dora-rslora-patterns": (
        "qwen2",
        torch.float32,
        dict(
            r=4,
            lora_alpha=8,
            target_modules=LLAMA_TARGETS,
            use_dora=True,
            use_rslora=True,
            rank_pattern={"k_proj": 2, "layers.0.mlp.up_proj": 6},
            alpha_pattern={"gate_proj": 3},
        ),
        {},
    ),
    "qwen2-embedding": (
        "qwen2",
        torch.float32,
        dict(r=4, lora_alpha=16, target_modules=["embed_tokens", "o_proj"], rank_pattern={"embed_tokens": 2}),
        {"save_embedding_layers": False},
    ),
    "llama-bf16": (
        "llama",
        torch.bfloat16,
        dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, use_rslora=True, alpha_pattern={"v_proj": 0.5}),
        {},
    ),
    "gpt2-bf16": (
        "gpt2",
        torch.bfloat16,
        dict(r=4, lora_alpha=8, target_modules=["wte", *GPT2_TARGETS], fan_in_fan_out=True),
        {"save_embedding_layers": False},
    ),
    "qwen2-bf16": (
        "qwen2",
        torch.bfloat16,
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True),
        {},
    ),
    "qwen2-dora-bf16": (
        "qwen2",
        torch.bfloat16,
        dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, use_dora=True),
        {},
    ),
}


def input_ids() -> torch.Tensor:
    return torch.arange(2 * 12).reshape(2, 12) * 7 % 64


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=input_ids()).logits.float()


def lora_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    """Module path (as in the base model) -> PEFT's LoRA layer."""
    return {
        name[len(WRAP) :]: module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and name.startswith(WRAP)
    }


def tame(model: torch.nn.Module, seed: int) -> None:
    """init_lora_weights=False gives O(1) factors: shrink the ups so merged weights stay O(1) (fp32
    ulps small), and move DoRA magnitudes and LoRA biases off their initial values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for up in layer.lora_B.values():
                up.weight.mul_(0.05)
                if up.bias is not None:
                    up.bias.copy_(torch.randn(up.bias.shape, generator=generator) * 0.1)
            for up in layer.lora_embedding_B.values():
                up.mul_(0.05)
            for magnitude in layer.lora_magnitude_vector.values():
                magnitude.weight.mul_(0.5 + torch.rand(magnitude.weight.shape, generator=generator))


def make_adapter(
    model_name: str, config: dict, directory: Path, dtype: torch.dtype = torch.float32, seed: int = 0, **save
) -> torch.nn.Module:
    """Save the adapter get_peft_model makes on the tiny model; return the PeftModel (eval, in `dtype`)."""
    base = MODELS[model_name]()
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, **config))
    tame(model, seed + 100)
    model = model.to(dtype).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(directory, **save)
    return model


def save_base(model_name: str, directory: Path, dtype: torch.dtype = torch.float32, **save) -> Path:
    model = MODELS[model_name]().to(dtype)
    model.save_pretrained(directory, **save)
    return directory


def touched_keys(model: torch.nn.Module) -> set[str]:
    """Base tensors a PeftModel's layers change when merged: each weight, and the bias under lora_bias."""
    keys = set()
    for path, layer in lora_layers(model).items():
        keys.add(f"{path}.weight")
        if any(up.bias is not None for up in layer.lora_B.values()):
            keys.add(f"{path}.bias")
    return keys


@torch.no_grad()
def peft_deltas(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """key -> PEFT's own scale * B @ A, in the stored weight's orientation (fp64)."""
    return {f"{path}.weight": layer.get_delta_weight("default").double() for path, layer in lora_layers(model).items()}


# ---------------------------------------------------------------------------------------------------
# reading safetensors files straight from their bytes
# ---------------------------------------------------------------------------------------------------


@dataclass
class Header:
    path: Path
    entries: dict[str, dict]  # name -> {"dtype", "shape", "data_offsets"}, in the header's own order
    metadata: dict[str, str] | None
    start: int  # where the data begins

    @property
    def file_order(self) -> list[str]:
        return sorted(self.entries, key=lambda k: self.entries[k]["data_offsets"][0])

    def nbytes(self, name: str) -> int:
        begin, end = self.entries[name]["data_offsets"]
        return end - begin

    def raw(self, name: str) -> bytes:
        begin, end = self.entries[name]["data_offsets"]
        with open(self.path, "rb") as f:
            f.seek(self.start + begin)
            return f.read(end - begin)


def read_header(path: Path) -> Header:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    metadata = header.pop("__metadata__", None)
    return Header(path, header, metadata, 8 + n)


class Checkpoint:
    """An HF model directory's weights: one model.safetensors, or shards named by the index."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX
        self.index = json.loads(index.read_text()) if index.exists() else None
        names = [SINGLE] if self.index is None else sorted(set(self.index["weight_map"].values()))
        self.files = {name: read_header(self.directory / name) for name in names}
        self.where = {key: name for name, h in self.files.items() for key in h.entries}

    @property
    def keys(self) -> list[str]:
        return [key for h in self.files.values() for key in h.file_order]

    def raw(self, key: str) -> bytes:
        return self.files[self.where[key]].raw(key)

    def dtype(self, key: str) -> str:
        return self.files[self.where[key]].entries[key]["dtype"]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.files:
            out.update(load_file(str(self.directory / name)))
        return out

    def weight_files(self) -> list[str]:
        return sorted(p.name for p in self.directory.iterdir() if p.name.endswith(".safetensors"))


def assert_valid_index(checkpoint: Checkpoint) -> None:
    index = checkpoint.index
    assert index is not None
    weight_map = index["weight_map"]
    assert set(weight_map) == set(checkpoint.where), "weight_map must name every tensor, and only those"
    for key, name in weight_map.items():
        assert checkpoint.where[key] == name, f"{key}: the index says {name}, the tensor is in {checkpoint.where[key]}"
    total = sum(h.nbytes(k) for h in checkpoint.files.values() for k in h.entries)
    assert index["metadata"]["total_size"] == total
    assert checkpoint.weight_files() == sorted(checkpoint.files), "a shard the index does not name"


def load_clean(directory: Path, dtype: torch.dtype) -> torch.nn.Module:
    model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True, dtype=dtype)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    assert not info["error_msgs"], info
    return model.eval()


def assert_untouched_identical(base: Checkpoint, out: Checkpoint, touched: set[str]) -> None:
    for key in base.keys:
        if key not in touched:
            assert out.dtype(key) == base.dtype(key), key
            assert out.raw(key) == base.raw(key), f"{key}: untouched, but its bytes changed"


def bf16_ulp(*tensors: torch.Tensor) -> torch.Tensor:
    """One bf16 ulp (8 significant bits) at the largest magnitude of the tensors, element-wise."""
    larger = torch.stack([t.float().abs() for t in tensors]).amax(0).clamp_min(torch.finfo(torch.bfloat16).tiny)
    return torch.exp2(torch.floor(torch.log2(larger)) - 7)


# ---------------------------------------------------------------------------------------------------
# ours against merge_and_unload
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> Callable[..., Path]:
    """One saved base per (model, dtype, shard size)."""
    cache: dict[tuple, Path] = {}

    def get(model_name: str, dtype: torch.dtype = torch.float32, shard: str | None = None) -> Path:
        key = (model_name, dtype, shard)
        if key not in cache:
            directory = tmp_path_factory.mktemp(f"base-{model_name}") / "base"
            save = {"max_shard_size": shard} if shard else {}
            cache[key] = save_base(model_name, directory, dtype, **save)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def merged(bases, tmp_path_factory) -> Callable[[str], SimpleNamespace]:
    """Per case: our merge of the saved base with the saved adapter, and PEFT's merge_and_unload."""
    cache: dict[str, SimpleNamespace] = {}

    def get(case: str) -> SimpleNamespace:
        if case not in cache:
            model_name, dtype, config, save = CASES[case]
            directory = tmp_path_factory.mktemp(case)
            base = bases(model_name, dtype)
            model = make_adapter(model_name, config, directory / "adapter", dtype, **save)
            touched = touched_keys(model)
            modules = len(lora_layers(model))
            report = loratool.merge(base, [directory / "adapter"], directory / "out", device="cpu")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # the same half-precision weights and factors merged in fp32: the correctly rounded truth
                exact = None if dtype == torch.float32 else copy.deepcopy(model).float().merge_and_unload()
                reference = model.merge_and_unload().eval()
            cache[case] = SimpleNamespace(
                model_name=model_name,
                dtype=dtype,
                base=base,
                out=directory / "out",
                report=report,
                touched=touched,
                modules=modules,
                reference=reference,
                exact=None if exact is None else exact.state_dict(),
                dora=bool(config.get("use_dora")),
            )
        return cache[case]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_merge_equals_merge_and_unload(merged, case: str) -> None:
    m = merged(case)
    base, out = Checkpoint(m.base), Checkpoint(m.out)
    theirs = m.reference.state_dict()
    ours = out.tensors()
    base_tensors = base.tensors()
    assert out.keys == base.keys
    assert m.touched <= set(ours), sorted(m.touched - set(ours))
    for key, value in ours.items():
        reference = theirs[key]
        assert value.dtype == reference.dtype == m.dtype, key
        assert value.shape == reference.shape, key
        if m.dtype == torch.float32:
            diff = float((value - reference).abs().max())
            assert diff <= FP32_ATOL, f"{key}: max abs diff {diff:g} from merge_and_unload"
        else:
            # PEFT rounds the delta to bf16 before adding it, so where W and the delta cancel it is
            # off by an ulp of the delta, not of the result: measure the ulp at the largest of both.
            # Its DoRA merge rounds to bf16 at every step (norm, ratio, product): a few ulps off.
            w, ours32, theirs32 = base_tensors[key].float(), value.float(), reference.float()
            gap = (ours32 - theirs32).abs()
            ulp = bf16_ulp(w, theirs32 - w, ours32, theirs32)
            worst = float((gap / ulp).max())
            ulps = BF16_DORA_ULPS if m.dora else 1
            assert bool((gap <= ulps * ulp).all()), f"{key}: {worst:g} bf16 ulps from merge_and_unload"
            # and ours is the fp32 merge of the same weights rounded once (half an ulp, plus fp32 noise)
            exact = m.exact[key].float()
            miss = (ours32 - exact).abs()
            bound = 0.5 * bf16_ulp(exact) + 2.0**-20 * torch.stack([w.abs(), (exact - w).abs()]).amax(0)
            worst = float((miss / bf16_ulp(exact)).max())
            assert bool((miss <= bound).all()), f"{key}: {worst:g} bf16 ulps from the fp32 merge of its weights"
        if key in m.touched:  # the update is not lost in rounding: the test would notice a no-op merge
            assert not torch.equal(value, base_tensors[key]), f"{key}: a LoRA targets it but it did not change"
    assert_untouched_identical(base, out, m.touched)

    report = m.report
    assert report.tensors_updated == len(m.touched)
    assert report.tensors_copied == len(base.keys) - len(m.touched)
    assert report.tensors_cast == 0
    assert report.files_written == 1
    assert report.bytes_written == sum(h.nbytes(k) for h in out.files.values() for k in h.entries)
    [lora] = report.loras
    assert lora.format == "peft"
    assert (lora.modules, lora.matched, lora.unmatched) == (m.modules, m.modules, [])
    assert lora.strength == 1.0


@pytest.mark.parametrize("case", list(CASES))
def test_merged_dir_loads_with_the_merged_logits(merged, case: str) -> None:
    m = merged(case)
    assert sorted(p.name for p in m.out.iterdir()) == sorted(p.name for p in m.base.iterdir())
    for name in ("config.json", "generation_config.json"):
        assert (m.out / name).read_bytes() == (m.base / name).read_bytes(), name
    loaded = load_clean(m.out, m.dtype)
    ours = Checkpoint(m.out).tensors()
    state = loaded.state_dict()
    for key, value in ours.items():
        assert torch.equal(state[key], value), f"{key}: from_pretrained holds other values than the file"
    diff = float((logits(loaded) - logits(m.reference)).abs().max())
    if m.dtype == torch.float32:
        assert diff <= LOGITS_ATOL, f"max abs logits diff {diff:g}"
    else:  # a bf16 ulp here and there in the weights, and bf16 arithmetic
        peak = float(logits(m.reference).abs().max())
        assert diff <= BF16_LOGITS_RTOL * max(1.0, peak), f"max abs logits diff {diff:g} (largest logit {peak:g})"


# ---------------------------------------------------------------------------------------------------
# the output mirrors the base: shards, index, header metadata, key order, untouched bytes
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["llama-dora", "gpt2-bias", "qwen2-plain"])
def test_sharded_base_gives_the_same_shards(bases, tmp_path: Path, case: str) -> None:
    model_name, dtype, config, save = CASES[case]
    base_dir = bases(model_name, dtype, SHARD)
    model = make_adapter(model_name, config, tmp_path / "adapter", dtype, **save)
    touched = touched_keys(model)
    report = loratool.merge(base_dir, [tmp_path / "adapter"], tmp_path / "out", device="cpu")
    base, out = Checkpoint(base_dir), Checkpoint(tmp_path / "out")
    assert base.index is not None and len(base.files) > 1, "the base should be sharded"

    assert sorted(p.name for p in out.directory.iterdir()) == sorted(p.name for p in base.directory.iterdir())
    assert out.weight_files() == base.weight_files()
    for name, header in base.files.items():
        theirs = out.files[name]
        assert list(theirs.entries) == list(header.entries), name
        assert theirs.file_order == header.file_order, name
        assert theirs.metadata == header.metadata, name
        for key, entry in header.entries.items():
            assert theirs.entries[key]["dtype"] == entry["dtype"], key
            assert theirs.entries[key]["shape"] == entry["shape"], key
    assert_valid_index(out)
    assert out.index["weight_map"] == base.index["weight_map"]
    assert {k: v for k, v in out.index["metadata"].items() if k != "total_size"} == {
        k: v for k, v in base.index["metadata"].items() if k != "total_size"
    }
    assert_untouched_identical(base, out, touched)
    assert report.files_written == len(base.files) + 1  # the shards and the index
    assert report.tensors_updated == len(touched)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = model.merge_and_unload().eval()
    theirs = reference.state_dict()
    for key, value in out.tensors().items():
        diff = float((value - theirs[key]).abs().max())
        assert diff <= FP32_ATOL, f"{key}: max abs diff {diff:g} from merge_and_unload"
    loaded = load_clean(out.directory, dtype)
    diff = float((logits(loaded) - logits(reference)).abs().max())
    assert diff <= LOGITS_ATOL, f"max abs logits diff {diff:g}"


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_shard_size_reshards_a_single_file_base(bases, tmp_path: Path, model_name: str) -> None:
    case = f"{model_name}-plain"
    _, dtype, config, save = CASES[case]
    base_dir = bases(model_name)
    make_adapter(model_name, config, tmp_path / "adapter", dtype, **save)
    whole = loratool.merge(base_dir, [tmp_path / "adapter"], tmp_path / "whole", device="cpu")
    limit = 20_000
    report = loratool.merge(base_dir, [tmp_path / "adapter"], tmp_path / "sharded", device="cpu", shard_size=limit)
    single, out = Checkpoint(tmp_path / "whole"), Checkpoint(tmp_path / "sharded")
    assert single.index is None and whole.files_written == 1

    assert out.index is not None, "shard_size should have written an index"
    assert not (out.directory / SINGLE).exists()
    assert len(out.files) > 1
    n = len(out.files)
    assert sorted(out.files) == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert_valid_index(out)
    for name, header in out.files.items():
        assert sum(header.nbytes(k) for k in header.entries) <= limit, name
        assert header.metadata == single.files[SINGLE].metadata, name
    assert out.keys == single.keys, "re-sharding keeps the base's tensor order"
    for key in single.keys:
        assert out.dtype(key) == single.dtype(key), key
        assert out.raw(key) == single.raw(key), f"{key}: re-sharding changed its bytes"
    assert report.files_written == n + 1
    assert report.tensors_updated == whole.tensors_updated
    assert (out.directory / "config.json").read_bytes() == (base_dir / "config.json").read_bytes()
    loaded = load_clean(out.directory, dtype)
    reference = load_clean(single.directory, dtype)
    assert torch.equal(logits(loaded), logits(reference))

    # and back: a shard size larger than the model writes one model.safetensors, no index
    again = loratool.merge(out.directory, [tmp_path / "adapter"], tmp_path / "again", device="cpu", shard_size=10**9)
    assert again.files_written == 1
    assert Checkpoint(tmp_path / "again").weight_files() == [SINGLE]
    assert not (tmp_path / "again" / INDEX).exists()


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def write_safetensors(path: Path, tensors: list[tuple[str, torch.Tensor]], metadata: dict[str, str]) -> None:
    """A safetensors file with the tensors in exactly this order (safetensors' own writer sorts them)."""
    header: dict[str, object] = {"__metadata__": metadata}
    blobs, offset = [], 0
    for name, tensor in tensors:
        blob = tensor.contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def test_untouched_bytes_header_metadata_and_key_order_are_kept(bases, tmp_path: Path) -> None:
    base_dir = tmp_path / "base"
    save_base("qwen2", base_dir)
    # A base whose tensors are not in the sorted order safetensors writes (reversed here), with
    # metadata beyond save_pretrained's {"format": "pt"}: both must be carried over, not regenerated.
    tensors = load_file(str(base_dir / SINGLE))
    metadata = {"format": "pt", "origin": "tiny qwen2", "note": "kept as is"}
    order = sorted(tensors, reverse=True)
    write_safetensors(base_dir / SINGLE, [(k, tensors[k]) for k in order], metadata)
    assert read_header(base_dir / SINGLE).file_order == order
    _, dtype, config, save = CASES["qwen2-bias"]
    model = make_adapter("qwen2", config, tmp_path / "adapter", dtype, **save)
    touched = touched_keys(model)
    loratool.merge(base_dir, [tmp_path / "adapter"], tmp_path / "out", device="cpu")

    base, out = read_header(base_dir / SINGLE), read_header(tmp_path / "out" / SINGLE)
    assert out.metadata == base.metadata == metadata
    assert list(out.entries) == list(base.entries), "header key order"
    assert out.file_order == base.file_order, "data order"
    assert out.entries == base.entries, "same dtypes, shapes and offsets"
    changed = [k for k in base.entries if out.raw(k) != base.raw(k)]
    assert sorted(changed) == sorted(touched)
    assert len(changed) < len(base.entries)
    load_clean(tmp_path / "out", torch.float32)


# ---------------------------------------------------------------------------------------------------
# weights: several LoRAs, and subtracting what was merged
# ---------------------------------------------------------------------------------------------------

TWO_LORAS = {
    "llama": (
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]),
        dict(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "gate_proj"], use_rslora=True),
    ),
    "gpt2": (
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
        dict(r=3, lora_alpha=5, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
    ),
}


@pytest.mark.parametrize("model_name", list(TWO_LORAS))
def test_two_loras_at_weights_add_their_weighted_deltas(bases, tmp_path: Path, model_name: str) -> None:
    base_dir = bases(model_name)
    first, second = TWO_LORAS[model_name]
    d1 = peft_deltas(make_adapter(model_name, first, tmp_path / "one", seed=1))
    d2 = peft_deltas(make_adapter(model_name, second, tmp_path / "two", seed=2))
    report = loratool.merge(
        base_dir, [tmp_path / "one", tmp_path / "two"], tmp_path / "out", weights=[0.7, -0.3], device="cpu"
    )
    base, out = Checkpoint(base_dir), Checkpoint(tmp_path / "out")
    w, ours = base.tensors(), out.tensors()
    touched = set(d1) | set(d2)
    assert set(d1) & set(d2), "the two LoRAs should share a module"
    for key in touched:
        expected = w[key].double() + 0.7 * d1.get(key, 0.0) - 0.3 * d2.get(key, 0.0)
        diff = float((ours[key].double() - expected).abs().max())
        assert diff <= FP32_ATOL, f"{key}: max abs diff {diff:g} from W + 0.7 d1 - 0.3 d2"
    assert_untouched_identical(base, out, touched)
    assert report.tensors_updated == len(touched)
    assert [s.strength for s in report.loras] == [0.7, -0.3]
    assert [s.matched for s in report.loras] == [len(d1), len(d2)]


@pytest.mark.parametrize("case", ["llama-patterns", "gpt2-rslora", "qwen2-bias", "qwen2-embedding"])
def test_merging_at_minus_one_gives_the_base_back(bases, tmp_path: Path, case: str) -> None:
    model_name, dtype, config, save = CASES[case]
    base_dir = bases(model_name, dtype)
    model = make_adapter(model_name, config, tmp_path / "adapter", dtype, **save)
    touched = touched_keys(model)
    loratool.merge(base_dir, [tmp_path / "adapter"], tmp_path / "plus", device="cpu")
    report = loratool.merge(tmp_path / "plus", [tmp_path / "adapter"], tmp_path / "back", weights=[-1.0], device="cpu")
    base, plus, back = Checkpoint(base_dir), Checkpoint(tmp_path / "plus"), Checkpoint(tmp_path / "back")
    w, p, b = base.tensors(), plus.tensors(), back.tensors()
    for key in touched:
        assert not torch.equal(p[key], w[key]), key
        diff = float((b[key] - w[key]).abs().max())
        assert diff <= FP32_ATOL, f"{key}: {diff:g} from the base after +1 then -1"
    assert_untouched_identical(base, back, touched)
    assert report.tensors_updated == len(touched)


# ---------------------------------------------------------------------------------------------------
# --dtype
# ---------------------------------------------------------------------------------------------------


HALF = {"bf16": (torch.bfloat16, "BF16"), "fp16": (torch.float16, "F16")}


@pytest.mark.parametrize("dtype", list(HALF))
def test_dtype_casts_every_float_tensor_once(bases, tmp_path: Path, dtype: str) -> None:
    torch_dtype, code = HALF[dtype]
    model_name, _, config, save = CASES["qwen2-bias"]
    base_dir = bases(model_name)
    model = make_adapter(model_name, config, tmp_path / "adapter", **save)
    touched = touched_keys(model)
    loratool.merge(base_dir, [tmp_path / "adapter"], tmp_path / "fp32", device="cpu")
    report = loratool.merge(base_dir, [tmp_path / "adapter"], tmp_path / "half", device="cpu", dtype=dtype)
    full, half = Checkpoint(tmp_path / "fp32"), Checkpoint(tmp_path / "half")
    base = Checkpoint(base_dir)
    assert all(base.dtype(k) == "F32" for k in base.keys)
    assert half.keys == base.keys
    assert {half.dtype(k) for k in half.keys} == {code}
    assert half.files[SINGLE].metadata == base.files[SINGLE].metadata
    wide, narrow = full.tensors(), half.tensors()
    for key in base.keys:
        assert narrow[key].dtype == torch_dtype, key
        assert torch.equal(narrow[key], wide[key].to(torch_dtype)), f"{key}: not the fp32 merge cast once"
    assert report.dtype == dtype
    assert report.tensors_updated == len(touched)
    assert report.tensors_cast == len(base.keys) - len(touched)
    assert report.tensors_copied == 0
    assert report.bytes_written == sum(h.nbytes(k) for h in half.files.values() for k in h.entries)
    load_clean(half.directory, torch_dtype)


# ---------------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------------


def test_cli_merge_json(bases, tmp_path: Path) -> None:
    base_dir = bases("llama")
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    model = make_adapter("llama", config, tmp_path / "adapter")
    deltas = peft_deltas(model)
    out = tmp_path / "out"
    args = ["merge", str(base_dir), str(tmp_path / "adapter"), "-o", str(out), "-w", "0.5", "--device", "cpu"]
    result = CliRunner().invoke(main, [*args, "-q", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["device"] == "cpu"
    assert report["dtype"] == "keep"
    [lora] = report["loras"]
    assert lora["strength"] == 0.5
    assert lora["format"] == "peft"
    assert lora["modules"] == lora["matched"] == len(deltas) == 6
    assert lora["unmatched"] == []
    assert report["tensors_updated"] == len(deltas)
    assert report["files_written"] == 1
    w, ours = Checkpoint(base_dir).tensors(), Checkpoint(out).tensors()
    for key, delta in deltas.items():
        diff = float((ours[key].double() - (w[key].double() + 0.5 * delta)).abs().max())
        assert diff <= FP32_ATOL, f"{key}: max abs diff {diff:g} from W + 0.5 d"

    # the same again: DEST exists, so one error line and exit 2; --force replaces it
    again = CliRunner().invoke(main, [*args, "-q"])
    assert again.exit_code == 2, again.output
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loratool: error:"), again.stderr
    assert "Traceback" not in again.output
    forced = CliRunner().invoke(main, [*args, "-q", "--force", "--shard-size", "20KB"])
    assert forced.exit_code == 0, forced.output
    sharded = Checkpoint(out)
    assert_valid_index(sharded)
    assert len(sharded.files) > 1
    assert all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name) for name in sharded.files)
    for key, value in sharded.tensors().items():
        assert torch.equal(value, ours[key]), key


def test_adapter_for_another_model_is_refused_and_nothing_is_written(bases, tmp_path: Path) -> None:
    make_adapter("gpt2", CASES["gpt2-plain"][2], tmp_path / "gpt2_adapter")
    dest = tmp_path / "out"
    with pytest.raises(MergeError) as caught:
        loratool.merge(bases("llama"), [tmp_path / "gpt2_adapter"], dest, device="cpu")
    assert isinstance(caught.value, LoratoolError)
    assert not dest.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2_adapter"]
    result = CliRunner().invoke(main, ["merge", str(bases("llama")), str(tmp_path / "gpt2_adapter"), "-o", str(dest)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loratool: error:"), result.stderr
    assert not dest.exists()
