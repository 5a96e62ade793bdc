"""A corpus of broken inputs, written to a directory, that every command must refuse cleanly.

Each `Case` is one input on disk plus what a user must be told about it. The tests
(test_corpus.py) run every command that takes such an input against it; the same script writes
the corpus for poking at by hand:

    python tests/robustness/corpus.py OUT_DIR

The broken files start from valid ones we build here (a kohya LoRA we ship, tiny checkpoints from
fixtures/tiny_models.py), so each case differs from a working input in exactly one way.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "fixtures"), str(ROOT / "tests")]

from test_inspect_base import bases  # noqa: E402
from tiny_models import clip_text_model, llama, sd15_unet  # noqa: E402

LORA = ROOT / "fixtures" / "kohya_sd15.safetensors"
SDXL_LORA = ROOT / "fixtures" / "kohya_sdxl.safetensors"
PEFT_DIR = ROOT / "fixtures" / "peft_llama"
DOWN = "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"
UP = "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"
ALPHA = "lora_unet_down_blocks_0_attentions_0_proj_in.alpha"


@dataclass(frozen=True)
class Case:
    """One broken input.

    role: "adapter" (given where a LoRA is expected) or "checkpoint" (a base or fine-tuned model).
    expect: a regex the one-line error must match.
    readable: the file parses, only its content is wrong; `inspect` reports it as findings
    (exit 0, or 1 with --strict) rather than refusing it, while the writing commands refuse it.
    """

    name: str
    role: str
    path: Path
    expect: str
    readable: bool = False


@dataclass(frozen=True)
class Valid:
    """The working inputs each broken one is a variation of."""

    lora: Path
    base: Path
    tuned: Path
    sdxl_lora: Path
    peft: Path
    llama_dir: Path
    pipeline: Path


# -- raw safetensors surgery -----------------------------------------------------------------------
def split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join(header: dict | bytes, data: bytes, length: int | None = None) -> bytes:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def _edit_entry(path: Path, name: str, **changes: object) -> bytes:
    header, data = split(path)
    header[name] = {**header[name], **changes}
    return join(header, data)


def _last(header: dict) -> str:
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])


def raw_cases(lora: Path) -> dict[str, tuple[bytes, str]]:
    """Byte-level damage: what the reader itself must catch. name -> (content, expected error)."""
    header, data = split(lora)
    body = json.dumps(header).encode()
    whole = join(header, data)
    last = _last(header)
    begin, end = header[last]["data_offsets"]
    first = min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    second = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])[1]
    dup = body[:-1] + b"," + json.dumps(first).encode() + b":" + json.dumps(header[first]).encode() + b"}"
    return {
        "empty": (b"", "empty"),
        "shorter-than-length-field": (b"\x10\x00\x00", "too short"),
        "truncated-header": (whole[: 8 + len(body) // 2], "truncated"),
        "header-length-past-end": (join(body, data, length=len(whole)), "past the end"),
        "header-length-above-limit": (join(body, data, length=2**40), "limit"),
        "header-not-json": (join(b"{" + b"x" * (len(body) - 1), data), "not JSON"),
        "header-not-utf8": (join(b'{"\xff":1}', data), "not JSON"),
        "header-not-object": (join(b"[" + b" " * (len(body) - 2) + b"]", data), "not a JSON object"),
        "offsets-out-of-range": (
            join({**header, last: {**header[last], "data_offsets": [begin, end + 4]}}, data),
            "past the",
        ),
        "offsets-overlap": (
            join({**header, second: {**header[second], "data_offsets": [0, header[second]["data_offsets"][1]]}}, data),
            "overlap|needs",
        ),
        "offsets-gap": (join(header, data + b"\0" * 16), "cover"),
        "offsets-gap-inside": (
            join({**header, first: {**header[first], "data_offsets": [8, header[first]["data_offsets"][1]]}}, data),
            "gap|needs",
        ),
        "dtype-shape-disagree": (
            join({**header, last: {**header[last], "shape": [*header[last]["shape"][:-1], 999]}}, data),
            "needs",
        ),
        "dtype-length-disagree": (join({**header, last: {**header[last], "dtype": "F64"}}, data), "needs"),
        "unknown-dtype": (join({**header, last: {**header[last], "dtype": "F4"}}, data), "unknown dtype"),
        "duplicate-keys": (join(dup, data), "duplicate"),
        "metadata-not-strings": (join({**header, "__metadata__": {"ss_network_dim": 4}}, data), "__metadata__"),
        "entry-not-object": (join({**header, last: [1, 2]}, data), "not an object"),
        "not-safetensors-at-all": (b"PK\x03\x04" + b"\0" * 60, "limit|past the end"),
    }


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def semantic_cases(lora: Path) -> dict[str, tuple[Callable[[dict], dict], str]]:
    """Valid safetensors whose adapter content is broken: name -> (edit of the tensors, expected error)."""

    def set_(key: str, value: torch.Tensor) -> Callable[[dict], dict]:
        return lambda t: {**t, key: value}

    def nan(t: dict) -> dict:
        up = t[UP].clone()
        up[0, 0] = float("nan")
        return {**t, UP: up}

    def inf(t: dict) -> dict:
        down = t[DOWN].clone()
        down[-1, -1] = float("-inf")
        return {**t, DOWN: down}

    def rank(t: dict) -> dict:
        return {**t, UP: torch.cat([t[UP], t[UP]], dim=1)}

    def only_down(t: dict) -> dict:
        return {k: v for k, v in t.items() if k != UP}

    return {
        "factor-ranks-disagree": (rank, "rank|shape"),
        "nan-factor": (nan, "NaN|non-finite"),
        "inf-factor": (inf, "inf|non-finite"),
        "missing-up-factor": (only_down, "lora_up|orphan|without"),
        "integer-factor": (lambda t: {**t, UP: (t[UP] * 100).to(torch.int32)}, "dtype|integer|float"),
        "alpha-not-a-scalar": (set_(ALPHA, torch.tensor([1.0, 2.0])), "alpha"),
        "nan-alpha": (set_(ALPHA, torch.tensor(float("nan"))), "alpha|NaN|non-finite"),
        "zero-rank": (
            lambda t: {**t, UP: t[UP][:, :0].contiguous(), DOWN: t[DOWN][:0].contiguous()},
            "rank|empty|shape",
        ),
        "one-dimensional-factor": (set_(UP, torch.ones(8)), "2-D"),
    }


# -- the corpus --------------------------------------------------------------------------------------
def valid_inputs(out: Path) -> Valid:
    out.mkdir(parents=True, exist_ok=True)
    lora = out / "valid_lora.safetensors"
    shutil.copy(LORA, lora)
    sdxl_lora = out / "valid_sdxl_lora.safetensors"
    shutil.copy(SDXL_LORA, sdxl_lora)
    peft = out / "valid_peft"
    shutil.copytree(PEFT_DIR, peft, dirs_exist_ok=True)
    (out / "bases_tmp").mkdir(exist_ok=True)
    built = bases(out / "bases_tmp")
    base = out / "valid_base.safetensors"
    shutil.move(built["sd1"], base)
    shutil.rmtree(out / "bases_tmp")
    tuned = out / "valid_tuned.safetensors"
    weights = load_file(base)
    g = torch.Generator().manual_seed(1)
    save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in weights.items()}, tuned)

    torch.manual_seed(0)
    llama_dir = out / "valid_llama"
    llama().save_pretrained(llama_dir, max_shard_size="20KB")
    pipeline = out / "valid_pipeline"
    sd15_unet().save_pretrained(pipeline / "unet")
    clip_text_model().save_pretrained(pipeline / "text_encoder")
    (pipeline / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "text_encoder": ["transformers", "CLIPTextModel"],
            }
        )
    )
    return Valid(lora, base, tuned, sdxl_lora, peft, llama_dir, pipeline)


def _peft_with_config(valid: Valid, dest: Path, config: str | None) -> Path:
    shutil.copytree(valid.peft, dest)
    if config is None:
        (dest / "adapter_config.json").unlink()
    else:
        (dest / "adapter_config.json").write_text(config)
    return dest


def _peft_config_edit(valid: Valid, **changes: object) -> str:
    config = json.loads((valid.peft / "adapter_config.json").read_text())
    config.update(changes)
    return json.dumps(config)


def build(out: Path) -> tuple[Valid, list[Case]]:
    """Write the valid inputs and every broken variation under `out`."""
    valid = valid_inputs(out / "valid")
    broken = out / "broken"
    broken.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    for name, (content, expect) in raw_cases(valid.lora).items():
        path = broken / f"{name}.safetensors"
        path.write_bytes(content)
        cases.append(Case(name, "adapter", path, expect))
    for name, (content, expect) in raw_cases(valid.base).items():
        path = broken / f"base-{name}.safetensors"
        path.write_bytes(content)
        cases.append(Case(f"base-{name}", "checkpoint", path, expect))

    # A header length within the limit's reach only on a file that big: refused before reading it.
    sparse = broken / "header-above-limit-sparse.safetensors"
    with open(sparse, "wb") as fh:
        fh.write(struct.pack("<Q", 120 << 20))
        fh.truncate(121 << 20)
    cases.append(Case("header-above-limit-sparse", "adapter", sparse, "limit"))

    tensors = _tensors(valid.lora)
    header, _ = split(valid.lora)
    for name, (edit, expect) in semantic_cases(valid.lora).items():
        path = broken / f"{name}.safetensors"
        save_file(edit(dict(tensors)), path, header.get("__metadata__"))
        cases.append(Case(name, "adapter", path, expect, readable=True))

    pickle = broken / "pickled_lora.pt"
    torch.save(tensors, pickle)
    cases.append(Case("pickle-checkpoint", "adapter", pickle, "pickle.*--allow-pickle"))
    torch.save({"state_dict": load_file(valid.base)}, pickle.with_suffix(".ckpt"))
    cases.append(Case("base-pickle-checkpoint", "checkpoint", pickle.with_suffix(".ckpt"), "pickle.*--allow-pickle"))

    cases.append(Case("missing-path", "adapter", broken / "does-not-exist.safetensors", "no such file"))
    cases.append(Case("base-missing-path", "checkpoint", broken / "no-base.safetensors", "no such file"))
    empty_dir = broken / "empty-dir"
    empty_dir.mkdir()
    cases.append(Case("empty-directory", "adapter", empty_dir, "no .safetensors"))
    cases.append(Case("base-empty-directory", "checkpoint", empty_dir, "no .safetensors"))
    cases.append(Case("checkpoint-given-as-lora", "adapter", valid.base, "no .*layout|not a LoRA|LoRA"))
    text = broken / "notes.safetensors"
    text.write_text("this is not a model\n")
    cases.append(Case("text-file", "adapter", text, "limit|past the end"))

    peft_configs = {
        "peft-config-missing": (None, "adapter_config|PEFT|layout"),
        "peft-config-not-json": ("{not json", "adapter_config.json: not valid JSON"),
        "peft-config-empty": ("", "adapter_config.json: not valid JSON"),
        "peft-config-not-object": ("[1, 2]", "JSON object"),
        "peft-config-no-rank": (None, "\\br\\b|rank"),
        "peft-config-rank-a-string": (_peft_config_edit(valid, r="four"), "\\br\\b|rank"),
        "peft-config-alpha-a-list": (_peft_config_edit(valid, lora_alpha=[8]), "lora_alpha|alpha"),
        "peft-config-unknown-type": (_peft_config_edit(valid, peft_type="PROMPT_TUNING"), "PROMPT_TUNING|peft_type"),
        "peft-config-rank-pattern-a-list": (_peft_config_edit(valid, rank_pattern=[1]), "rank_pattern"),
        "peft-config-rank-disagrees": (_peft_config_edit(valid, r=16, rank_pattern={}), "rank|shape"),
    }
    no_rank = json.loads((valid.peft / "adapter_config.json").read_text())
    del no_rank["r"]
    for name, (config, expect) in peft_configs.items():
        if name == "peft-config-no-rank":
            config = json.dumps(no_rank)
        path = _peft_with_config(valid, broken / name, config)
        # PEFT's default r is 8: without one, the config disagrees with the rank-4 factors.
        readable = name in ("peft-config-rank-disagrees", "peft-config-no-rank")
        cases.append(Case(name, "adapter", path, expect, readable=readable))
    peft_weights_broken = _peft_with_config(valid, broken / "peft-weights-truncated", None)
    shutil.copy(valid.peft / "adapter_config.json", peft_weights_broken / "adapter_config.json")
    weights = peft_weights_broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    cases.append(Case("peft-weights-truncated", "adapter", peft_weights_broken, "truncated|past the end"))

    shards = broken / "sharded-missing-shard"
    shutil.copytree(valid.llama_dir, shards)
    index = json.loads((shards / "model.safetensors.index.json").read_text())
    missing = sorted(set(index["weight_map"].values()))[-1]
    (shards / missing).unlink()
    cases.append(Case("sharded-index-missing-shard", "checkpoint", shards, f"names shard {missing}"))
    bad_index = broken / "sharded-broken-index"
    shutil.copytree(valid.llama_dir, bad_index)
    (bad_index / "model.safetensors.index.json").write_text('{"weight_map": 3}')
    cases.append(Case("sharded-index-broken", "checkpoint", bad_index, "weight_map"))

    folder = broken / "diffusers-missing-component"
    shutil.copytree(valid.pipeline, folder)
    shutil.rmtree(folder / "text_encoder")
    cases.append(Case("diffusers-missing-component", "checkpoint", folder, "component 'text_encoder'"))
    folder_index = broken / "diffusers-broken-model-index"
    shutil.copytree(valid.pipeline, folder_index)
    (folder_index / "model_index.json").write_text("{")
    cases.append(Case("diffusers-broken-model-index", "checkpoint", folder_index, "model_index.json: not valid JSON"))
    # Fine on its own, but one module is narrower than the base's weight: only a base can tell.
    narrow = broken / "narrower-than-the-base.safetensors"
    save_file({**tensors, DOWN: tensors[DOWN][:, :-1].contiguous()}, narrow, header.get("__metadata__"))
    cases.append(Case("narrower-than-the-base", "pair", narrow, "is \\[32, 32\\] in the base|base weight is"))
    return valid, cases


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        sys.exit("usage: python tests/robustness/corpus.py OUT_DIR")
    _, cases = build(Path(argv[0]))
    for case in cases:
        print(f"{case.role:10} {case.name:40} {case.path}")


if __name__ == "__main__":
    main(sys.argv[1:])
