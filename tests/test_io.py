"""loratool.io: the lazy safetensors reader, the container opener and the streaming atomic writers.

The `safetensors` package is the oracle: what it writes we must read identically, and what we write
it must read back identically.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import struct
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loratool.errors import InputError, OutputError
from loratool.io import atomic as atomic_module
from loratool.io import safetensors_file as sf_module
from loratool.io import writer as writer_module
from loratool.io.atomic import atomic_write_text
from loratool.io.safetensors_file import MAX_HEADER_BYTES, SafetensorsFile, bytes_are_finite, rounded
from loratool.io.source import open_source
from loratool.io.writer import (
    SafetensorsWriter,
    ShardedWriter,
    TensorSpec,
    shard_plan,
)

# Every safetensors dtype torch has (the file format's names).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g, dtype=torch.float64) * 4).to(dtype)
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -(2**62)), min(info.max, 2**62)
    return torch.randint(lo, hi, shape, generator=g, dtype=torch.int64).to(dtype)


def all_dtype_tensors() -> dict[str, torch.Tensor]:
    """Per dtype: a 2-D tensor, a 0-d tensor and an empty one."""
    out: dict[str, torch.Tensor] = {}
    for i, (name, dtype) in enumerate(DTYPES.items()):
        out[f"{name}.matrix"] = sample(dtype, (3, 5), i)
        out[f"{name}.scalar"] = sample(dtype, (), 100 + i)
        out[f"{name}.empty"] = sample(dtype, (0, 4), 200 + i)
    return out


def raw(t: torch.Tensor) -> bytes:
    """A tensor's bytes, independent of loratool (bit-exact: NaNs, -0.0, fp8 all compare)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype
    assert tuple(a.shape) == tuple(b.shape)
    assert raw(a) == raw(b)


def write_raw_file(path: Path, header: bytes | dict, data: bytes = b"", length: int | None = None) -> Path:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)
    return path


def entry(dtype: str, shape: list, offsets: list) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def assert_one_line_naming(exc: pytest.ExceptionInfo, name: str | Path) -> None:
    message = str(exc.value)
    assert "\n" not in message and "\r" not in message
    assert str(name) in message, message


# ---------------------------------------------------------------------------------------------------
# SafetensorsFile: reading
# ---------------------------------------------------------------------------------------------------
def test_load_matches_safetensors_for_every_dtype(tmp_path: Path) -> None:
    tensors = all_dtype_tensors()
    metadata = {"format": "pt", "ss_network_dim": "4", "note": "ünïcode ✓"}
    path = tmp_path / "all.safetensors"
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    reference = safetensors.torch.load_file(path)

    with SafetensorsFile(path) as f:
        assert f.metadata == metadata
        assert len(f) == len(tensors)
        assert set(f.keys()) == set(tensors)
        for name in tensors:
            assert name in f
            loaded = f.load(name)
            assert_same(loaded, reference[name])
            assert_same(loaded, tensors[name])
        assert "missing" not in f


def test_keys_info_follow_the_header_offsets(tmp_path: Path) -> None:
    tensors = all_dtype_tensors()
    path = tmp_path / "all.safetensors"
    safetensors.torch.save_file(tensors, path)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    by_offset = sorted(header, key=lambda k: tuple(header[k]["data_offsets"]))
    with SafetensorsFile(path) as f:
        assert f.header_size == n
        assert f.data_start == 8 + n
        assert f.file_size == len(data)
        keys = f.keys()
        # data-offset order; ties are only possible between zero-length tensors and their neighbour
        assert [header[k]["data_offsets"][0] for k in keys] == sorted(header[k]["data_offsets"][0] for k in keys)
        assert set(keys) == set(by_offset)
        assert list(f) == keys
        for name, entry_ in header.items():
            info = f.info(name)
            assert info.name == name
            assert info.dtype == entry_["dtype"]
            assert info.shape == tuple(entry_["shape"])
            assert (info.begin, info.end) == tuple(entry_["data_offsets"])
            assert info.nbytes == info.end - info.begin
            assert info.numel == tensors[name].numel()
            assert info.torch_dtype == tensors[name].dtype
            assert bytes(f.read_bytes(name)) == data[8 + n + info.begin : 8 + n + info.end]


def test_keys_are_in_data_order_not_header_order(tmp_path: Path) -> None:
    header = {
        "zeta": entry("F32", [1], [0, 4]),
        "alpha": entry("F32", [2], [12, 20]),
        "mid": entry("F16", [4], [4, 12]),
    }
    data = struct.pack("<f", 1.5) + struct.pack("<4e", 1, 2, 3, 4) + struct.pack("<2f", 7, 8)
    path = write_raw_file(tmp_path / "order.safetensors", header, data)
    with SafetensorsFile(path) as f:
        assert f.keys() == ["zeta", "mid", "alpha"]
        assert f.load("alpha").tolist() == [7.0, 8.0]
        assert f.load("mid").tolist() == [1.0, 2.0, 3.0, 4.0]
        assert f.load("zeta").tolist() == [1.5]
    ref = safetensors.torch.load_file(path)
    assert ref["alpha"].tolist() == [7.0, 8.0]


def test_open_reads_only_the_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file with a 1 GiB data region (sparse, partly garbage) opens instantly, reading only the header."""
    huge = 2**30
    header = {
        "__metadata__": {"k": "v"},
        "big": entry("U8", [huge], [0, huge]),
        "tail": entry("F32", [2], [huge, huge + 8]),
    }
    body = json.dumps(header).encode()
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(body)) + body)
        fh.write(bytes(range(256)) * 16)  # some garbage at the start of the data region; the rest is a hole
        fh.seek(8 + len(body) + huge)
        fh.write(struct.pack("<2f", 3.0, -1.0))

    read_counts: list[int] = []
    real_open = open

    class CountingFile:
        def __init__(self, fh) -> None:
            self._fh = fh
            read_counts.append(0)
            self._slot = len(read_counts) - 1

        def read(self, n: int = -1) -> bytes:
            out = self._fh.read(n)
            read_counts[self._slot] += len(out)
            return out

        def readinto(self, buf) -> int:
            got = self._fh.readinto(buf)
            read_counts[self._slot] += got
            return got

        def __getattr__(self, name: str):
            return getattr(self._fh, name)

    monkeypatch.setattr(sf_module, "open", lambda *a, **k: CountingFile(real_open(*a, **k)), raising=False)
    start = time.perf_counter()
    tracemalloc.start()
    try:
        f = SafetensorsFile(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - start
    try:
        assert read_counts == [8 + len(body)]
        assert peak < 1 << 20
        assert elapsed < 2.0
        assert f.keys() == ["big", "tail"]
        assert f.info("big").nbytes == huge
        assert f.load("tail").tolist() == [3.0, -1.0]  # positional read far into the file
    finally:
        f.close()


# ---------------------------------------------------------------------------------------------------
# SafetensorsFile: malformed input
# ---------------------------------------------------------------------------------------------------
F32_1 = entry("F32", [1], [0, 4])

MALFORMED: dict[str, tuple[bytes, str]] = {}


def _case(name: str, content: bytes, why: str) -> None:
    MALFORMED[name] = (content, why)


def _file(header: bytes | dict, data: bytes = b"", length: int | None = None) -> bytes:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + data


_case("empty file", b"", "empty")
_case("3 bytes", b"\x01\x02\x03", "short")
_case("7 bytes", b"\x02\x00\x00\x00\x00\x00\x00", "short")
_case("header length past end", _file(b"{}", length=1000), "past the end")
_case("header length 1 past end", _file(b"{}  ", length=5), "past the end")
_case("header above limit", _file(b"{}", length=MAX_HEADER_BYTES + 1), "limit")
_case("header 2**40", _file(b"{}", length=2**40), "limit")
_case("header 2**64-1", _file(b"{}", length=2**64 - 1), "limit")
_case("header not utf-8", _file(b'{"\xff\xfe":1}'), "JSON")
_case("header not json", _file(b"{not json"), "JSON")
_case("header truncated json", _file(b'{"a": {"dtype": "F32"'), "JSON")
_case("header a json array", _file(b"[]"), "object")
_case("header a json string", _file(b'"abc"'), "object")
_case("header json null", _file(b"null"), "object")
_case("metadata int value", _file({"__metadata__": {"a": 1}, "t": F32_1}, b"\0" * 4), "__metadata__")
_case("metadata null value", _file({"__metadata__": {"a": None}}), "__metadata__")
_case("metadata a list", _file({"__metadata__": ["a", "b"]}), "__metadata__")
_case("metadata a string", _file({"__metadata__": "a"}), "__metadata__")
_case("metadata nested", _file({"__metadata__": {"a": {"b": "c"}}}), "__metadata__")
_case("entry not an object", _file({"t": [1, 2]}), "'t'")
_case("unknown dtype", _file({"t": entry("F4", [1], [0, 4])}, b"\0" * 4), "dtype")
_case("lowercase dtype", _file({"t": entry("f32", [1], [0, 4])}, b"\0" * 4), "dtype")
_case("missing dtype", _file({"t": {"shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "dtype")
_case("negative dim", _file({"t": entry("F32", [-1], [0, 4])}, b"\0" * 4), "shape")
_case("float dim", _file({"t": entry("F32", [1.0], [0, 4])}, b"\0" * 4), "shape")
_case("string dim", _file({"t": entry("F32", ["1"], [0, 4])}, b"\0" * 4), "shape")
_case("boolean dim", _file({"t": entry("F32", [True], [0, 4])}, b"\0" * 4), "shape")
_case("shape not a list", _file({"t": entry("F32", 1, [0, 4])}, b"\0" * 4), "shape")
_case("missing shape", _file({"t": {"dtype": "F32", "data_offsets": [0, 4]}}, b"\0" * 4), "shape")
_case("offsets past data", _file({"t": entry("F32", [2], [0, 8])}, b"\0" * 4), "offset|past|region")
_case("offsets reversed", _file({"t": entry("F32", [1], [4, 0])}, b"\0" * 4), "offset")
_case("offsets negative", _file({"t": entry("F32", [1], [-4, 0])}, b"\0" * 4), "offset")
_case("offsets three numbers", _file({"t": entry("F32", [1], [0, 4, 8])}, b"\0" * 8), "offset")
_case("offsets floats", _file({"t": entry("F32", [1], [0.0, 4.0])}, b"\0" * 4), "offset")
_case("offsets boolean", _file({"t": entry("U8", [1], [False, True])}, b"\0"), "offset")
_case("offsets missing", _file({"t": {"dtype": "F32", "shape": [1]}}, b"\0" * 4), "offset")
_case(
    "overlapping tensors",
    _file({"a": entry("F32", [1], [0, 4]), "b": entry("F32", [1], [2, 6])}, b"\0" * 6),
    "overlap",
)
_case(
    "same bytes twice",
    _file({"a": entry("F32", [1], [0, 4]), "b": entry("F32", [1], [0, 4])}, b"\0" * 4),
    "overlap",
)
_case("gap before first tensor", _file({"a": entry("F32", [1], [4, 8])}, b"\0" * 8), "gap")
_case(
    "gap between tensors",
    _file({"a": entry("F32", [1], [0, 4]), "b": entry("F32", [1], [8, 12])}, b"\0" * 12),
    "gap",
)
_case("trailing bytes not covered", _file({"a": entry("F32", [1], [0, 4])}, b"\0" * 8), "cover")
_case("data but no tensors", _file({}, b"\0" * 8), "cover")
_case("dtype x shape too big", _file({"a": entry("F32", [2], [0, 4])}, b"\0" * 4), "needs")
_case("dtype x shape too small", _file({"a": entry("F16", [1], [0, 4])}, b"\0" * 4), "needs")
_case("empty shape with bytes", _file({"a": entry("F32", [0, 3], [0, 4])}, b"\0" * 4), "needs")
_case(
    "duplicate tensor names",
    _file(
        b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
        b"\0" * 4,
    ),
    "duplicate",
)


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_files_raise_one_line_input_error(case: str, tmp_path: Path) -> None:
    import re

    content, why = MALFORMED[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    tracemalloc.start()
    try:
        with pytest.raises(InputError) as exc:
            SafetensorsFile(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_one_line_naming(exc, path)
    assert re.search(why, str(exc.value), re.IGNORECASE), str(exc.value)
    assert peak < 1 << 20  # a claimed 2**40-byte header is refused without allocating it


def test_malformed_file_handle_is_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened = []
    real_open = open

    def tracking_open(*a, **k):
        fh = real_open(*a, **k)
        opened.append(fh)
        return fh

    monkeypatch.setattr(sf_module, "open", tracking_open, raising=False)
    path = write_raw_file(tmp_path / "bad.safetensors", b"[]")
    with pytest.raises(InputError):
        SafetensorsFile(path)
    assert opened and all(fh.closed for fh in opened)


def test_missing_file_and_directory_raise_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError) as exc:
        SafetensorsFile(tmp_path / "nope.safetensors")
    assert_one_line_naming(exc, tmp_path / "nope.safetensors")
    with pytest.raises(InputError) as exc:
        SafetensorsFile(tmp_path)
    assert_one_line_naming(exc, tmp_path)


def test_empty_header_file_is_valid(tmp_path: Path) -> None:
    path = write_raw_file(tmp_path / "none.safetensors", b"{}")
    with SafetensorsFile(path) as f:
        assert f.keys() == [] and f.metadata == {}
    assert safetensors.torch.load_file(path) == {}


# ---------------------------------------------------------------------------------------------------
# open_source: files, PEFT, HF shards, diffusers folders
# ---------------------------------------------------------------------------------------------------
def save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    return path


def test_open_single_file(tmp_path: Path) -> None:
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(2, dtype=torch.float16)}
    path = save(tmp_path / "lora.safetensors", tensors, {"ss_network_dim": "2"})
    with open_source(path) as src:
        assert src.container == "file"
        assert src.config is None
        assert set(src.keys()) == {"a", "b"}
        assert src.metadata == {"ss_network_dim": "2"}
        assert src.nbytes == path.stat().st_size
        assert src.info("b").shape == (2, 3)
        for k, v in tensors.items():
            assert_same(src.load(k), v)
            assert_same(src.ref(k).load(), v)


def test_open_missing_path(tmp_path: Path) -> None:
    with pytest.raises(InputError) as exc:
        open_source(tmp_path / "absent.safetensors")
    assert_one_line_naming(exc, tmp_path / "absent.safetensors")


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin", ".CKPT"])
def test_pickle_files_are_refused_with_conversion_advice(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(InputError) as exc:
        open_source(path)
    assert_one_line_naming(exc, path)
    message = str(exc.value).lower()
    assert "convert" in message and "safetensors" in message


def peft_dir(tmp_path: Path, config: str | None = '{"peft_type": "LORA", "r": 4, "lora_alpha": 8}') -> Path:
    d = tmp_path / "adapter"
    save(d / "adapter_model.safetensors", {"base_model.model.x.lora_A.weight": torch.ones(4, 3)}, {"format": "pt"})
    if config is not None:
        (d / "adapter_config.json").write_text(config)
    return d


def test_open_peft_directory(tmp_path: Path) -> None:
    d = peft_dir(tmp_path)
    with open_source(d) as src:
        assert src.container == "peft"
        assert src.config == {"peft_type": "LORA", "r": 4, "lora_alpha": 8}
        assert src.keys() == ["base_model.model.x.lora_A.weight"]
        assert torch.equal(src.load("base_model.model.x.lora_A.weight"), torch.ones(4, 3))


@pytest.mark.parametrize("config", ["{not json", "[1, 2]", '"text"', ""])
def test_peft_directory_with_broken_config(tmp_path: Path, config: str) -> None:
    d = peft_dir(tmp_path, config)
    with pytest.raises(InputError) as exc:
        open_source(d)
    assert_one_line_naming(exc, d / "adapter_config.json")


def test_peft_directory_without_config_is_refused(tmp_path: Path) -> None:
    """Reading it as a bare state dict would assume alpha = rank: the silent alpha loss we exist to prevent."""
    d = peft_dir(tmp_path, None)
    with pytest.raises(InputError) as exc:
        open_source(d)
    assert_one_line_naming(exc, d)
    assert "adapter_config.json" in str(exc.value)


def test_peft_directory_without_weights(tmp_path: Path) -> None:
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text('{"r": 4}')
    with pytest.raises(InputError) as exc:
        open_source(d)
    assert_one_line_naming(exc, d)
    assert "adapter_model.safetensors" in str(exc.value)
    (d / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(InputError) as exc:
        open_source(d)
    assert_one_line_naming(exc, d)
    assert "safetensors" in str(exc.value)


def make_sharded(d: Path) -> dict[str, torch.Tensor]:
    shard1 = {"model.embed.weight": torch.randn(4, 3), "model.layers.0.w": torch.randn(3, 3)}
    shard2 = {"model.layers.1.w": torch.randn(3, 3), "lm_head.weight": torch.randn(4, 3).half()}
    save(d / "model-00001-of-00002.safetensors", shard1, {"format": "pt"})
    save(d / "model-00002-of-00002.safetensors", shard2, {"format": "pt"})
    weight_map = {k: "model-00001-of-00002.safetensors" for k in shard1}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in shard2})
    index = {"metadata": {"total_size": 123}, "weight_map": weight_map}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 3}))
    return {**shard1, **shard2}


def test_open_hf_sharded_directory_and_index(tmp_path: Path) -> None:
    tensors = make_sharded(tmp_path)
    for target in (tmp_path, tmp_path / "model.safetensors.index.json"):
        with open_source(target) as src:
            assert src.container == "sharded"
            assert src.config == {"model_type": "llama", "hidden_size": 3}
            assert sorted(src.keys()) == sorted(tensors)
            assert len(src.files) == 2
            for k, v in tensors.items():
                assert_same(src.load(k), v)
            assert src.ref("lm_head.weight").file.path.name == "model-00002-of-00002.safetensors"


def test_sharded_index_naming_a_missing_shard(tmp_path: Path) -> None:
    make_sharded(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(InputError) as exc:
        open_source(tmp_path)
    assert_one_line_naming(exc, "model-00002-of-00002.safetensors")


def test_sharded_index_mapping_a_key_to_the_wrong_shard(tmp_path: Path) -> None:
    make_sharded(tmp_path)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(InputError) as exc:
        open_source(tmp_path)
    assert_one_line_naming(exc, index_path)
    assert "lm_head.weight" in str(exc.value)
    index["weight_map"]["lm_head.weight"] = "model-00002-of-00002.safetensors"
    index["weight_map"]["not.there"] = "model-00002-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(InputError) as exc:
        open_source(tmp_path)
    assert "not.there" in str(exc.value)


@pytest.mark.parametrize("weight_map", [None, [1, 2], {"a": 3}, "x"])
def test_sharded_index_without_valid_weight_map(tmp_path: Path, weight_map: object) -> None:
    index_path = tmp_path / "model.safetensors.index.json"
    index_path.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(InputError) as exc:
        open_source(index_path)
    assert_one_line_naming(exc, index_path)


def test_sharded_index_pointing_outside_its_directory(tmp_path: Path) -> None:
    d = tmp_path / "model"
    d.mkdir()
    save(tmp_path / "outside.safetensors", {"w": torch.ones(1)})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../outside.safetensors"}}))
    with pytest.raises(InputError) as exc:
        open_source(d)
    assert_one_line_naming(exc, d / "model.safetensors.index.json")


MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.42.1",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "safety_checker": [None, None],
    "feature_extractor": [None, None],
}


def make_diffusers(d: Path) -> dict[str, torch.Tensor]:
    unet = {"conv_in.weight": torch.randn(4, 4, 3, 3), "down_blocks.0.attentions.0.proj_in.weight": torch.randn(4, 4)}
    te = {"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.randn(3, 3).bfloat16()}
    save(d / "unet" / "diffusion_pytorch_model.safetensors", unet)
    save(d / "text_encoder" / "model.safetensors", te)
    (d / "scheduler").mkdir()
    (d / "scheduler" / "scheduler_config.json").write_text("{}")
    (d / "tokenizer").mkdir()
    (d / "model_index.json").write_text(json.dumps(MODEL_INDEX))
    return {**{f"unet.{k}": v for k, v in unet.items()}, **{f"text_encoder.{k}": v for k, v in te.items()}}


def test_open_diffusers_folder(tmp_path: Path) -> None:
    expected = make_diffusers(tmp_path)
    # a variant next to the default weights must not be picked
    save(tmp_path / "unet" / "diffusion_pytorch_model.fp16.safetensors", {"other": torch.ones(1)})
    with open_source(tmp_path) as src:
        assert src.container == "diffusers"
        assert src.config == MODEL_INDEX
        assert sorted(src.keys()) == sorted(expected)
        for k, v in expected.items():
            assert_same(src.load(k), v)


def test_diffusers_folder_with_sharded_component(tmp_path: Path) -> None:
    make_diffusers(tmp_path)
    index = dict(MODEL_INDEX, transformer=["diffusers", "FluxTransformer2DModel"])
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    d = tmp_path / "transformer"
    save(d / "diffusion_pytorch_model-00001-of-00002.safetensors", {"a.weight": torch.ones(2)})
    save(d / "diffusion_pytorch_model-00002-of-00002.safetensors", {"b.weight": torch.zeros(3)})
    (d / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    "a.weight": "diffusion_pytorch_model-00001-of-00002.safetensors",
                    "b.weight": "diffusion_pytorch_model-00002-of-00002.safetensors",
                }
            }
        )
    )
    with open_source(tmp_path) as src:
        assert "transformer.a.weight" in src and "transformer.b.weight" in src
        assert torch.equal(src.load("transformer.b.weight"), torch.zeros(3))


@pytest.mark.parametrize("how", ["missing directory", "directory without weights"])
def test_diffusers_folder_missing_a_model_component(tmp_path: Path, how: str) -> None:
    make_diffusers(tmp_path)
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    if how == "missing directory":
        (tmp_path / "unet").rmdir()
    with pytest.raises(InputError) as exc:
        open_source(tmp_path)
    assert_one_line_naming(exc, tmp_path)
    assert "unet" in str(exc.value)


def test_directory_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError) as exc:
        open_source(tmp_path)
    assert_one_line_naming(exc, tmp_path)


def test_directory_with_one_plain_weights_file(tmp_path: Path) -> None:
    save(tmp_path / "model.safetensors", {"w": torch.ones(2)})
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with open_source(tmp_path) as src:
        assert src.container == "file"
        assert src.config == {"model_type": "gpt2"}
        assert src.keys() == ["w"]


def test_directory_with_ambiguous_weights(tmp_path: Path) -> None:
    save(tmp_path / "one.safetensors", {"w": torch.ones(2)})
    save(tmp_path / "two.safetensors", {"w": torch.ones(2)})
    with pytest.raises(InputError) as exc:
        open_source(tmp_path)
    assert_one_line_naming(exc, tmp_path)


# ---------------------------------------------------------------------------------------------------
# SafetensorsWriter
# ---------------------------------------------------------------------------------------------------
def specs_of(tensors: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec.of(k, v) for k, v in tensors.items()]


def write_all(path: Path, tensors: dict[str, torch.Tensor], metadata=None, **kw) -> Path:
    with SafetensorsWriter(path, specs_of(tensors), metadata, **kw) as w:
        for k, v in tensors.items():
            w.write(k, v)
    return path


def parse(path: Path) -> tuple[int, dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8 : 8 + n].decode("utf-8")), data[8 + n :]


def test_writer_round_trips_every_dtype_through_safetensors(tmp_path: Path) -> None:
    tensors = all_dtype_tensors()
    # declared order differs from sorted order on purpose
    tensors = dict(reversed(list(tensors.items())))
    metadata = {"ss_network_alpha": "8", "modelspec.title": "测试 ✓", "empty": ""}
    path = write_all(tmp_path / "out.safetensors", tensors, metadata)
    assert files_in(tmp_path) == ["out.safetensors"]

    loaded = safetensors.torch.load_file(path)
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert_same(loaded[k], v)
    with safetensors.safe_open(path, "pt") as f:
        assert f.metadata() == metadata

    n, header, data = parse(path)
    assert (8 + n) % 8 == 0  # data region aligned like safetensors' own files
    header.pop("__metadata__")
    assert list(header) == list(tensors)  # header in declared order
    offsets = [tuple(header[k]["data_offsets"]) for k in tensors]
    assert offsets[0][0] == 0 and offsets[-1][1] == len(data)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(offsets))  # tensors in declared order
    assert data == b"".join(raw(v) for v in tensors.values())

    with SafetensorsFile(path) as f:
        assert f.keys() == list(tensors)  # data order == declared order
        assert f.metadata == metadata
        for k, v in tensors.items():
            assert_same(f.load(k), v)


def test_writer_header_is_on_disk_before_any_tensor(tmp_path: Path) -> None:
    tensors = {"b": torch.ones(3), "a": torch.zeros(2, 2)}
    dest = tmp_path / "out.safetensors"
    w = SafetensorsWriter(dest, specs_of(tensors), {"k": "v"})
    try:
        w._fh.flush()
        (tmp,) = [tmp_path / p for p in files_in(tmp_path)]
        assert tmp.name.startswith(".") and tmp.name.endswith(".tmp")  # temp file next to the destination
        assert not dest.exists()
        _, header, data = parse(tmp)
        assert data == b""
        assert header["b"]["data_offsets"] == [0, 12] and header["a"]["data_offsets"] == [12, 28]
        assert [s.name for s in w.pending] == ["b", "a"]
        w.write("b", tensors["b"])
        assert [s.name for s in w.pending] == ["a"]
        w.write("a", tensors["a"])
        inode = tmp.stat().st_ino
        assert w.commit() == dest
    finally:
        w.abort()
    # committed by rename: the destination is the very file that was written, nothing else remains
    assert dest.stat().st_ino == inode
    assert files_in(tmp_path) == ["out.safetensors"]
    assert torch.equal(safetensors.torch.load_file(dest)["a"], tensors["a"])


@pytest.mark.parametrize(
    ("name", "tensor"),
    [
        ("b", torch.zeros(2)),  # wrong order
        ("a", torch.zeros(2, dtype=torch.float16)),  # wrong dtype
        ("a", torch.zeros(3)),  # wrong shape
        ("a", torch.zeros(1, 2)),  # wrong rank
    ],
)
def test_writer_refuses_undeclared_tensors(tmp_path: Path, name: str, tensor: torch.Tensor) -> None:
    specs = [TensorSpec("a", "F32", (2,)), TensorSpec("b", "F32", (2,))]
    dest = tmp_path / "out.safetensors"
    with pytest.raises(ValueError), SafetensorsWriter(dest, specs) as w:
        w.write(name, tensor)
    assert files_in(tmp_path) == []


def test_writer_refuses_extra_tensors_missing_tensors_and_duplicates(tmp_path: Path) -> None:
    dest = tmp_path / "out.safetensors"
    with pytest.raises(ValueError), SafetensorsWriter(dest, [TensorSpec("a", "F32", (1,))]) as w:
        w.write("a", torch.ones(1))
        w.write("b", torch.ones(1))
    assert files_in(tmp_path) == []
    w = SafetensorsWriter(dest, [TensorSpec("a", "F32", (1,)), TensorSpec("b", "F32", (1,))])
    w.write("a", torch.ones(1))
    with pytest.raises(ValueError, match="b"):
        w.commit()
    assert files_in(tmp_path) == []
    with pytest.raises(ValueError):
        SafetensorsWriter(dest, [TensorSpec("a", "F32", (1,)), TensorSpec("a", "F32", (1,))])
    assert files_in(tmp_path) == []


def test_write_raw_copies_bytes(tmp_path: Path) -> None:
    tensors = all_dtype_tensors()
    src_path = save(tmp_path / "src.safetensors", tensors)
    dest = tmp_path / "copy.safetensors"
    with SafetensorsFile(src_path) as src:
        specs = [TensorSpec(k, src.info(k).dtype, src.info(k).shape) for k in src]
        with SafetensorsWriter(dest, specs) as w:
            for k in src:
                w.write_raw(k, src.read_bytes(k), src.info(k).dtype, src.info(k).shape)
        expected_data = b"".join(bytes(src.read_bytes(k)) for k in src)
    assert parse(dest)[2] == expected_data
    loaded = safetensors.torch.load_file(dest)
    for k, v in tensors.items():
        assert_same(loaded[k], v)
    with pytest.raises(ValueError), SafetensorsWriter(tmp_path / "x.safetensors", [TensorSpec("a", "F32", (2,))]) as w:
        w.write_raw("a", b"\0" * 4, "F32", (2,))
    assert not (tmp_path / "x.safetensors").exists()


def test_exception_inside_with_leaves_nothing(tmp_path: Path) -> None:
    tensors = {"a": torch.ones(4), "b": torch.ones(4)}
    dest = tmp_path / "out.safetensors"

    def produce():
        yield "a", tensors["a"]
        raise RuntimeError("producer failed")

    with pytest.raises(RuntimeError, match="producer failed"), SafetensorsWriter(dest, specs_of(tensors)) as w:
        for k, v in produce():
            w.write(k, v)
    assert files_in(tmp_path) == []


def test_failed_write_keeps_the_existing_destination(tmp_path: Path) -> None:
    dest = tmp_path / "out.safetensors"
    dest.write_bytes(b"previous contents")
    tensors = {"a": torch.ones(4), "b": torch.ones(4)}
    with pytest.raises(KeyError), SafetensorsWriter(dest, specs_of(tensors)) as w:
        w.write("a", tensors["a"])
        w.write("b", {}["b"])
    assert dest.read_bytes() == b"previous contents"
    assert files_in(tmp_path) == ["out.safetensors"]


class FailingFile:
    """Wraps a real file; `write` fails with ENOSPC once `budget` bytes are spent."""

    def __init__(self, fh, budget: int) -> None:
        self._fh = fh
        self._budget = budget

    def write(self, data) -> int:
        size = len(memoryview(data).cast("B"))
        if size > self._budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._budget -= size
        return self._fh.write(data)

    def __getattr__(self, name: str):
        return getattr(self._fh, name)


@pytest.mark.parametrize("budget", [0, 8, 500])
def test_os_error_while_writing_is_output_error_and_keeps_destination(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget: int
) -> None:
    dest = tmp_path / "out.safetensors"
    dest.write_bytes(b"previous contents")
    tensors = {"a": torch.ones(64), "b": torch.ones(64)}
    real_fdopen = os.fdopen
    monkeypatch.setattr(writer_module.os, "fdopen", lambda *a, **k: FailingFile(real_fdopen(*a, **k), budget))
    with pytest.raises(OutputError) as exc, SafetensorsWriter(dest, specs_of(tensors)) as w:
        for k, v in tensors.items():
            w.write(k, v)
    assert_one_line_naming(exc, dest)
    assert dest.read_bytes() == b"previous contents"
    assert files_in(tmp_path) == ["out.safetensors"]


def test_os_error_on_rename_is_output_error_and_keeps_destination(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "out.safetensors"
    dest.write_bytes(b"previous contents")

    def failing_replace(src, dst):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(writer_module.os, "replace", failing_replace)
    with pytest.raises(OutputError) as exc:
        write_all(dest, {"a": torch.ones(2)})
    assert_one_line_naming(exc, dest)
    assert dest.read_bytes() == b"previous contents"
    assert files_in(tmp_path) == ["out.safetensors"]


def test_commit_replaces_an_existing_destination(tmp_path: Path) -> None:
    dest = tmp_path / "out.safetensors"
    dest.write_bytes(b"previous contents")
    write_all(dest, {"a": torch.arange(3.0)})
    assert torch.equal(safetensors.torch.load_file(dest)["a"], torch.arange(3.0))
    assert files_in(tmp_path) == ["out.safetensors"]


def test_unusable_output_directory_is_output_error(tmp_path: Path) -> None:
    for dest in (tmp_path / "missing" / "out.safetensors", tmp_path / "file" / "out.safetensors"):
        (tmp_path / "file").write_text("a regular file, not a directory")
        with pytest.raises(OutputError) as exc:
            SafetensorsWriter(dest, [TensorSpec("a", "F32", (1,))])
        assert_one_line_naming(exc, dest.parent)
        with pytest.raises(OutputError):
            atomic_write_text(dest, "x")
    if os.geteuid() != 0:  # root writes anywhere; the check above covers the error path for it
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(OutputError):
            SafetensorsWriter(ro / "out.safetensors", [TensorSpec("a", "F32", (1,))])


@pytest.mark.parametrize(
    "metadata",
    [None, {}, {"ss_network_dim": "4", "título": "ñandú ✓"}, {"sshs_model_hash": "stale", "z": "1"}],
)
def test_record_hash_stores_sha256_of_the_data_region(tmp_path: Path, metadata: dict | None) -> None:
    tensors = {"up": torch.randn(8, 2).half(), "alpha": torch.tensor(2.0).bfloat16(), "down": torch.randn(2, 8)}
    path = write_all(tmp_path / "out.safetensors", tensors, metadata, record_hash=True)
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n].decode("utf-8"))  # still valid JSON after patching
    digest = hashlib.sha256(blob[8 + n :]).hexdigest()
    assert header["__metadata__"]["sshs_model_hash"] == digest
    for k, v in (metadata or {}).items():
        if k != "sshs_model_hash":
            assert header["__metadata__"][k] == v
    with safetensors.safe_open(path, "pt") as f:
        assert f.metadata()["sshs_model_hash"] == digest
    loaded = safetensors.torch.load_file(path)
    for k, v in tensors.items():
        assert_same(loaded[k], v)


def test_without_record_hash_no_hash_is_added(tmp_path: Path) -> None:
    path = write_all(tmp_path / "out.safetensors", {"a": torch.ones(2)}, {"k": "v"})
    with safetensors.safe_open(path, "pt") as f:
        assert f.metadata() == {"k": "v"}


# ---------------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------------
def test_shard_plan_groups_in_order_within_the_limit() -> None:
    specs = [TensorSpec(f"t{i}", "F32", (n,)) for i, n in enumerate([10, 10, 30, 5, 100, 1])]  # 40,40,120,20,400,4
    plan = shard_plan(specs, max_bytes=100)
    names = [name for name, _ in plan]
    assert names == [f"model-{i:05d}-of-00005.safetensors" for i in range(1, 6)]
    assert [[s.name for s in group] for _, group in plan] == [["t0", "t1"], ["t2"], ["t3"], ["t4"], ["t5"]]
    assert [s for _, group in plan for s in group] == specs
    for _, group in plan:
        assert sum(s.nbytes for s in group) <= 100 or len(group) == 1
    assert shard_plan(specs, max_bytes=10**9, stem="diffusion_pytorch_model") == [
        ("diffusion_pytorch_model-00001-of-00001.safetensors", specs)
    ]


def test_sharded_writer_output_reads_back_everywhere(tmp_path: Path) -> None:
    tensors = {f"layers.{i}.weight": sample(torch.float32, (4, 4), i) for i in range(5)}
    tensors["scale"] = torch.tensor(1.5, dtype=torch.bfloat16)
    tensors["mask"] = torch.tensor([True, False])
    specs = specs_of(tensors)
    plan = shard_plan(specs, max_bytes=130)
    assert len(plan) > 2
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with ShardedWriter(tmp_path, plan, "model.safetensors.index.json", {"format": "pt"}, {"note": "x"}) as w:
        for k, v in tensors.items():
            w.write(k, v)
        index_path = w.commit()
    assert index_path == tmp_path / "model.safetensors.index.json"
    shard_names = [name for name, _ in plan]
    assert files_in(tmp_path) == sorted(["config.json", "model.safetensors.index.json", *shard_names])
    assert all(n.startswith("model-0000") and n.endswith(f"-of-{len(plan):05d}.safetensors") for n in shard_names)

    index = json.loads(index_path.read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in tensors.values())
    assert index["metadata"]["note"] == "x"
    assert index["weight_map"] == {s.name: name for name, group in plan for s in group}

    for name, group in plan:
        loaded = safetensors.torch.load_file(tmp_path / name)
        assert set(loaded) == {s.name for s in group}
        for s in group:
            assert_same(loaded[s.name], tensors[s.name])
        with safetensors.safe_open(tmp_path / name, "pt") as f:
            assert f.metadata() == {"format": "pt"}

    for target in (tmp_path, index_path):
        with open_source(target) as src:
            assert src.container == "sharded"
            assert src.config == {"model_type": "llama"}
            assert sorted(src.keys()) == sorted(tensors)
            for k, v in tensors.items():
                assert_same(src.load(k), v)


def test_sharded_writer_abort_leaves_no_files(tmp_path: Path) -> None:
    tensors = {f"t{i}": torch.ones(10) for i in range(4)}
    plan = shard_plan(specs_of(tensors), max_bytes=80)
    with pytest.raises(RuntimeError), ShardedWriter(tmp_path, plan, "model.safetensors.index.json") as w:
        w.write("t0", tensors["t0"])
        w.write("t1", tensors["t1"])
        raise RuntimeError("stop")
    assert files_in(tmp_path) == []

    w = ShardedWriter(tmp_path, plan, "model.safetensors.index.json")
    w.write("t0", tensors["t0"])
    w.abort()
    assert files_in(tmp_path) == []


def test_sharded_writer_missing_tensor_fails_commit_and_leaves_no_files(tmp_path: Path) -> None:
    tensors = {f"t{i}": torch.ones(10) for i in range(4)}
    plan = shard_plan(specs_of(tensors), max_bytes=80)
    w = ShardedWriter(tmp_path, plan, "model.safetensors.index.json")
    for k in ("t0", "t1", "t2"):
        w.write(k, tensors[k])
    with pytest.raises(ValueError):
        w.commit()
    assert "model.safetensors.index.json" not in files_in(tmp_path)
    assert not [n for n in files_in(tmp_path) if n.endswith(".tmp")]


def test_sharded_writer_leaves_no_temp_files_when_the_block_ends_without_commit(tmp_path: Path) -> None:
    """Leaving the `with` block normally must not strand temporary shard files (commit or abort)."""
    tensors = {"a": torch.ones(10), "b": torch.ones(10)}
    plan = shard_plan(specs_of(tensors), max_bytes=40)
    with ShardedWriter(tmp_path, plan, "model.safetensors.index.json") as w:
        for k, v in tensors.items():
            w.write(k, v)
    assert not [n for n in files_in(tmp_path) if n.endswith(".tmp")], files_in(tmp_path)


def test_sharded_writer_unusable_directory(tmp_path: Path) -> None:
    plan = shard_plan([TensorSpec("a", "F32", (1,))], max_bytes=10)
    with pytest.raises(OutputError):
        ShardedWriter(tmp_path / "missing", plan, "model.safetensors.index.json")


# ---------------------------------------------------------------------------------------------------
# atomic_write_text
# ---------------------------------------------------------------------------------------------------
def test_atomic_write_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "config.json"
    assert atomic_write_text(path, "first ✓\n") == path
    assert path.read_text(encoding="utf-8") == "first ✓\n"
    atomic_write_text(path, "second")
    assert path.read_text(encoding="utf-8") == "second"
    assert files_in(tmp_path) == ["config.json"]

    def failing_replace(src, dst):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(writer_module.os, "replace", failing_replace)
    with pytest.raises(OutputError) as exc:
        atomic_write_text(path, "third")
    assert_one_line_naming(exc, path)
    assert path.read_text(encoding="utf-8") == "second"
    assert files_in(tmp_path) == ["config.json"]


# ---------------------------------------------------------------------------------------------------
# Property: whatever small float tensors we write, both readers return them bit for bit
# ---------------------------------------------------------------------------------------------------
tensor_strategy = st.tuples(
    st.sampled_from(FLOAT_DTYPES),
    st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple),
    st.integers(0, 2**31 - 1),
)


@settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(tensor_strategy, min_size=1, max_size=5),
    names=st.lists(st.text("abcxyz._0123", min_size=1, max_size=8), min_size=5, max_size=5, unique=True),
    metadata=st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3),
    record_hash=st.booleans(),
)
def test_property_writer_round_trip(specs, names, metadata, record_hash) -> None:
    metadata = {k: v for k, v in metadata.items() if k != "sshs_model_hash"}
    tensors = {
        name: sample(DTYPES[dtype], shape, seed) for name, (dtype, shape, seed) in zip(names, specs, strict=False)
    }
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "prop.safetensors"
        write_all(path, tensors, metadata, record_hash=record_hash)
        assert files_in(Path(d)) == ["prop.safetensors"]
        loaded = safetensors.torch.load_file(path)
        with safetensors.safe_open(path, "pt") as f:
            got_meta = f.metadata() or {}
        with SafetensorsFile(path) as f:
            assert f.metadata == got_meta
            mine = {k: f.load(k) for k in f}
    if record_hash:
        got_meta = dict(got_meta)
        assert len(got_meta.pop("sshs_model_hash")) == 64
    assert got_meta == metadata
    assert set(loaded) == set(mine) == set(tensors)
    for k, v in tensors.items():
        assert_same(loaded[k], v)
        assert_same(mine[k], v)


# ---------------------------------------------------------------------------------------------------
# atomic_directory
# ---------------------------------------------------------------------------------------------------
def _fill(directory: Path, text: str) -> None:
    (directory / "weights.safetensors").write_text(text)
    (directory / "config.json").write_text(text)


@pytest.mark.parametrize("swap", ["exchange", "move-aside"])
def test_atomic_directory_replaces_an_existing_directory(tmp_path: Path, monkeypatch, swap) -> None:
    if swap == "move-aside":
        monkeypatch.setattr(atomic_module, "_exchange", lambda a, b: False)
    dest = tmp_path / "out"
    dest.mkdir()
    _fill(dest, "old")
    with atomic_module.atomic_directory(dest, replace_existing=True) as tmp:
        _fill(tmp, "new")
        assert (dest / "config.json").read_text() == "old"  # nothing changes before the block ends
    assert {p.name: p.read_text() for p in dest.iterdir()} == {"weights.safetensors": "new", "config.json": "new"}
    assert files_in(tmp_path) == ["out"]


def test_atomic_directory_swaps_in_one_step_on_linux(tmp_path: Path) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("renameat2 is Linux-only")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    assert atomic_module._exchange(a, b)
    assert ((a / "x").read_text(), (b / "x").read_text()) == ("b", "a")


def test_atomic_directory_failure_keeps_the_old_directory(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    _fill(dest, "old")
    with pytest.raises(RuntimeError), atomic_module.atomic_directory(dest, replace_existing=True) as tmp:
        _fill(tmp, "new")
        raise RuntimeError("mid-write")
    assert (dest / "config.json").read_text() == "old"
    assert files_in(tmp_path) == ["out"]


def test_outputs_get_the_umask_permissions_not_mkstemps(tmp_path):
    """A merged model that only its writer can read is no use to a UI running as another user."""
    import loratool

    fixtures = Path(__file__).resolve().parents[1] / "fixtures"
    umask = os.umask(0o022)
    os.umask(umask)
    loratool.convert(fixtures / "kohya_sd15.safetensors", "diffusers", tmp_path / "file.safetensors")
    loratool.convert(fixtures / "peft_llama", "peft", tmp_path / "adapter_dir")
    assert (tmp_path / "file.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "adapter_dir").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "adapter_dir" / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


BAD = (float("nan"), float("inf"), float("-inf"))


@pytest.mark.parametrize(
    ("dtype", "name"),
    [
        (torch.float64, "F64"),
        (torch.float32, "F32"),
        (torch.float16, "F16"),
        (torch.bfloat16, "BF16"),
        (torch.float8_e4m3fn, "F8_E4M3"),
        (torch.float8_e5m2, "F8_E5M2"),
    ],
)
def test_finite_bytes_and_rounding_agree_with_torch(dtype, name):
    """The header path's torch-free arithmetic: NaN/inf found in raw bytes, and a number rounded to a
    dtype, exactly as torch finds and rounds them."""
    g = torch.Generator().manual_seed(0)
    values = torch.randn(4096, generator=g, dtype=torch.float64) * torch.logspace(-12, 12, 4096, dtype=torch.float64)
    stored = values.to(dtype)
    finite = stored[torch.isfinite(stored.float())]
    for tensor in (stored, finite, *(torch.cat([finite, torch.tensor([bad], dtype=dtype)]) for bad in BAD)):
        raw = tensor.view(torch.uint8).numpy().tobytes()
        assert bytes_are_finite(raw, name) == bool(torch.isfinite(tensor.float()).all())
    if name.startswith("F8"):
        return
    for value in [*values.tolist()[::7], 0.1, 1 / 3, 65519.0, 65520.0, 3.5e38, 81.09374820820511]:
        assert rounded(value, name) == torch.tensor(value, dtype=dtype).item()
