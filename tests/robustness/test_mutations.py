"""Random damage to valid files never gives a traceback, an unforeseen error, or an exit code
outside {0, 1, 2}; and a command that fails leaves nothing behind.

Two kinds of damage: raw bytes (overwritten, cut, inserted anywhere, mostly in the header where
the structure lives), and edits of the parsed header that keep it valid JSON (dtypes, shapes,
offsets, key names, metadata values), which reach much deeper than byte noise does.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from corpus import Valid, valid_inputs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loratool.cli import main

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
SEEDS = {
    "kohya": FIXTURES / "kohya_sd15.safetensors",
    "diffusers": FIXTURES / "diffusers_sd15.safetensors",
    "loha": FIXTURES / "lycoris_loha.safetensors",
    "peft": FIXTURES / "peft_llama",
}
SAME_WIDTH = [["F64", "I64"], ["F32", "I32"], ["F16", "BF16"], ["U8", "I8", "BOOL", "F8_E4M3", "F8_E5M2"]]
DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "X9"]
KEY_WORDS = ["lora_up", "lora_down", "alpha", "lora_A", "lora_B", "hada_w1_a", "weight", "dora_scale", "", "."]


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> Valid:
    return valid_inputs(tmp_path_factory.mktemp("valid"))


def weights_file(root: Path) -> Path:
    return root / "adapter_model.safetensors" if root.is_dir() else root


# -- damage -----------------------------------------------------------------------------------------
@st.composite
def byte_damage(draw, raw: bytes) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    data = bytearray(raw)
    for _ in range(draw(st.integers(1, 4))):
        in_header = draw(st.booleans())
        lo, hi = (0, 8 + n) if in_header else (8 + n, len(data))
        at = draw(st.integers(min(lo, len(data) - 1), max(0, min(hi, len(data)) - 1)))
        # In the data region, mostly values change (NaN, inf, huge) and the structure stays.
        choices = ["overwrite", "cut", "insert", "truncate"] if in_header else ["overwrite"] * 6 + ["cut", "truncate"]
        how = draw(st.sampled_from(choices))
        chunk = draw(st.binary(min_size=1, max_size=8))
        if how == "overwrite":
            data[at : at + len(chunk)] = chunk
        elif how == "cut":
            del data[at : at + len(chunk)]
        elif how == "insert":
            data[at:at] = chunk
        else:
            del data[at:]
    return bytes(data)


def _value(draw, old):
    if isinstance(old, str):
        return draw(st.one_of(st.sampled_from(DTYPES), st.text(max_size=6), st.just(old + "x")))
    if isinstance(old, list):
        return draw(
            st.one_of(
                st.lists(st.integers(-2, 70000), max_size=5),
                st.just([*old, 1]),
                st.just(old[:-1]),
                st.just(old[::-1]),
                st.lists(st.one_of(st.floats(allow_nan=False), st.text(max_size=2), st.none()), max_size=3),
            )
        )
    return draw(st.one_of(st.integers(-5, 5), st.none(), st.text(max_size=4), st.floats()))


@st.composite
def header_damage(draw, raw: bytes) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    names = sorted(k for k in header if k != "__metadata__")
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["field", "reshape", "retype", "rename", "drop", "metadata", "duplicate-bytes"]))
        name = draw(st.sampled_from(names))
        entry = header.get(name)
        if how == "reshape" and isinstance(entry, dict):  # same byte count: the reader cannot object
            numel = 1
            for d in entry["shape"]:
                numel *= d
            dims = [d for d in (1, 2, 4, 8, 16, 32, 64) if numel % d == 0]
            first = draw(st.sampled_from(dims))
            shape = draw(st.sampled_from([[first, numel // first], [numel], [first, numel // first, 1, 1], []]))
            if shape != [] or numel == 1:
                header[name] = {**entry, "shape": shape}
        elif how == "retype" and isinstance(entry, dict):  # same width: bytes reinterpreted
            group = next((g for g in SAME_WIDTH if entry["dtype"] in g), [entry["dtype"]])
            header[name] = {**entry, "dtype": draw(st.sampled_from(group))}
        elif how == "field" and isinstance(entry, dict):
            field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
            header[name] = {**header[name], field: _value(draw, header[name].get(field))}
        elif how == "rename" and name in header:
            old = draw(st.sampled_from([w for w in KEY_WORDS if w and w in name] or ["."]))
            new = draw(st.sampled_from(KEY_WORDS))
            header[name.replace(old, new, 1)] = header.pop(name)
        elif how == "drop":
            header.pop(name, None)
        elif how == "metadata":
            meta = dict(header.get("__metadata__") or {})
            key = draw(st.sampled_from([*sorted(meta), "ss_network_alpha", "lora_adapter_metadata", "ss_v2"]))
            meta[key] = draw(st.one_of(st.text(max_size=12), st.just('{"r": "x"}'), st.just("1e400"), st.just("True")))
            header["__metadata__"] = meta
        else:  # two tensors claiming the same bytes
            other = draw(st.sampled_from(names))
            if isinstance(header.get(name), dict) and isinstance(header.get(other), dict):
                header[name] = {**header[name], "data_offsets": header[other]["data_offsets"]}
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


CONFIG_FIELDS = ["r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "fan_in_fan_out", "peft_type"]
CONFIG_FIELDS += ["target_modules", "use_dora", "modules_to_save", "task_type"]


@st.composite
def config_damage(draw, text: str) -> str:
    config = json.loads(text)
    for _ in range(draw(st.integers(1, 3))):
        field = draw(st.sampled_from(CONFIG_FIELDS))
        config[field] = draw(
            st.one_of(
                st.integers(-3, 64),
                st.floats(),
                st.booleans(),
                st.none(),
                st.text(max_size=5),
                st.sampled_from(["LORA", "LOHA", "LOKR", "IA3", "ADALORA"]),
                st.dictionaries(st.sampled_from(["q_proj", "^model", "(", "v_proj$"]), st.integers(-1, 16)),
                st.lists(st.sampled_from(["q_proj", "k_proj", "lm_head"]), max_size=3),
            )
        )
    return json.dumps(config)


@st.composite
def damaged(draw, seed: str) -> tuple[bytes, str | None]:
    """(weights file bytes, adapter_config.json text or None when the seed is a single file)."""
    raw = weights_file(SEEDS[seed]).read_bytes()
    config = (SEEDS[seed] / "adapter_config.json").read_text() if SEEDS[seed].is_dir() else None
    if config is not None and draw(st.booleans()):
        return raw, draw(config_damage(config))
    return draw(st.one_of(byte_damage(raw), header_damage(raw))), config


# -- commands ---------------------------------------------------------------------------------------
def invocations(seed: str, lora: Path, out: Path, valid: Valid) -> list[list[str]]:
    base = valid.llama_dir if seed == "peft" else valid.base
    dest = out / "dest.safetensors"
    return [
        ["inspect", str(lora), "--json"],
        ["inspect", str(lora), "--base", str(base), "--strict"],
        ["convert", str(lora), "--to", "kohya", "-o", str(dest), "--quiet"],
        ["convert", str(lora), "--to", "peft", "-o", str(out / "dest_peft"), "--quiet"],
        ["convert", str(lora), "--to", "diffusers", "-o", str(dest), "--quiet"],
        ["merge", str(base), str(lora), "-o", str(dest if seed != "peft" else out / "merged"), "--quiet"],
        ["resize", str(lora), "--rank", "2", "-o", str(dest), "--quiet"],
    ]


def check_every_command(seed: str, damage: tuple[bytes, str | None], valid: Valid) -> None:
    content, config = damage
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if SEEDS[seed].is_dir():
            lora = root / "adapter"
            shutil.copytree(SEEDS[seed], lora)
        else:
            lora = root / "lora.safetensors"
        weights_file(lora).write_bytes(content)
        if config is not None:
            (lora / "adapter_config.json").write_text(config)
        for args in invocations(seed, lora, root / "out", valid):
            out = root / "out"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            result = CliRunner().invoke(main, args)
            said = result.stderr.strip()
            where = f"{' '.join(args[:1])} -> exit {result.exit_code}: {said[:300]}"
            assert result.exit_code in (0, 1, 2), where
            assert "Traceback" not in result.output + result.stderr, where
            assert "unexpected" not in said, where
            if result.exit_code != 0:
                assert len(said.splitlines()) == 1, where
                assert list(out.iterdir()) == [], where
            assert weights_file(lora).read_bytes() == content, where


SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.mark.parametrize("seed", sorted(SEEDS))
def test_damaged_files_never_crash_any_command(valid, seed):
    @SETTINGS
    @given(damage=damaged(seed))
    def prop(damage: tuple[bytes, str | None]) -> None:
        check_every_command(seed, damage, valid)

    prop()
