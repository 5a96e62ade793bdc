"""Lazy, validating reader for one safetensors file.

Only the header is parsed when a file is opened; tensor bytes are read one tensor at a time, on
request. The header is checked as strictly as the `safetensors` library checks it (offsets
contiguous and covering the data region, byte lengths matching dtype x shape), so every later
stage can trust what it is told and a broken file fails here with one clear line.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections.abc import Callable, Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy

from ..errors import InputError
from ..lazy_torch import torch

# Larger headers are refused before anything is allocated for them (safetensors uses the same cap).
MAX_HEADER_BYTES = 100 * 1024 * 1024
PAGE = 4096  # what one small read of a setting fetches (see SafetensorsFile._small_read)

# The safetensors dtype names and their torch dtypes (U16/U32/U64 where this torch has them). Built
# on first use, so reading a header needs no torch; FLOAT_DTYPES is the same facts as plain data.
TORCH_DTYPE_ATTRS = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


class _TorchTable(Mapping):
    """A read-only table built from torch the first time it is read."""

    def __init__(self, build: Callable[[], dict]) -> None:
        self._build = build

    @cached_property
    def _table(self) -> dict:
        return self._build()

    def __getitem__(self, key: object) -> object:
        return self._table[key]

    def __iter__(self) -> Iterator:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)


def _torch_dtypes() -> dict[str, torch.dtype]:
    return {name: getattr(torch, attr) for name, attr in TORCH_DTYPE_ATTRS.items() if hasattr(torch, attr)}


DTYPES: Mapping[str, torch.dtype] = _TorchTable(_torch_dtypes)
DTYPE_NAMES: Mapping[torch.dtype, str] = _TorchTable(lambda: {v: k for k, v in DTYPES.items()})


# Bytes per element, and the struct format of one element where Python's struct has one.
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
DTYPE_SIZES |= {"F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
SCALAR_FORMATS = {"F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b"}
SCALAR_FORMATS |= {"U8": "<B", "BOOL": "<?", "U16": "<H", "U32": "<I", "U64": "<Q"}


def dtype_size(dtype: str) -> int:
    return DTYPE_SIZES[dtype]


# Per float dtype: the unsigned integer of its width and the exponent bits that are all ones only in
# inf and NaN (E4M3 has no inf: its NaN is the all-ones exponent and mantissa).
_NON_FINITE_BITS = {
    "F64": ("<u8", 0x7FF0000000000000),
    "F32": ("<u4", 0x7F800000),
    "F16": ("<u2", 0x7C00),
    "BF16": ("<u2", 0x7F80),
    "F8_E5M2": ("u1", 0x7C),
    "F8_E4M3": ("u1", 0x7F),
}


def bytes_are_finite(raw: bytes | bytearray, dtype: str) -> bool:
    """No inf or NaN in a tensor's raw little-endian bytes, read as integers (no torch, no copy)."""
    if dtype not in _NON_FINITE_BITS:
        return True  # integers and bools
    width, mask = _NON_FINITE_BITS[dtype]
    bits = numpy.frombuffer(raw, dtype=width)
    return not bool(numpy.any((bits & bits.dtype.type(mask)) == mask))


def rounded(value: float, dtype: str) -> float:
    """`value` as a tensor of `dtype` holds it (what `torch.tensor(value, dtype=...).item()` gives):
    float dtypes without torch, so header checks of alphas need none."""
    if dtype == "F64":
        return value
    if dtype == "F32":
        return as_float32(value)
    if dtype == "F16":  # through float32 first, as torch converts
        try:
            return struct.unpack("<e", struct.pack("<e", as_float32(value)))[0]
        except OverflowError:
            return math.copysign(math.inf, value)
    if dtype == "BF16":  # the upper half of the float32, rounded to nearest even
        single = as_float32(value)
        if math.isnan(single):
            return single
        (bits,) = struct.unpack("<I", struct.pack("<f", single))
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return struct.unpack("<f", struct.pack("<I", bits))[0]
    return float(torch.tensor(value, dtype=DTYPES[dtype]).item())


def as_float32(value: float) -> float:
    """`value` rounded to float32, as `tensor.float()` gives it (beyond float32's range: inf)."""
    try:
        return struct.unpack("<f", struct.pack("<f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


class TensorInfo(NamedTuple):
    """Where a tensor lives and what it is, from the header alone (a tuple: a header holds
    thousands, and a library scan builds them for every file)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offset inside the data region
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def tensor_from_bytes(buf: bytearray, info: TensorInfo) -> torch.Tensor:
    if info.numel == 0:
        return torch.empty(info.shape, dtype=info.torch_dtype)
    flat = torch.frombuffer(buf, dtype=torch.uint8).view(info.torch_dtype)
    if sys.byteorder != "little" and flat.element_size() > 1:
        flat = torch.from_numpy(flat.numpy().byteswap())
    return flat.reshape(info.shape)


class SafetensorsFile:
    """A safetensors file whose header has been read and checked, with tensors loaded on demand."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self._fh = open(self.path, "rb")  # noqa: SIM115 - kept open for on-demand reads, closed in close()
        except FileNotFoundError:
            raise InputError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise InputError(f"{self.path}: is a directory, expected a .safetensors file") from None
        except OSError as exc:
            raise InputError(f"{self.path}: cannot open ({exc.strerror})") from None
        self._last_page: tuple[int, bytes] = (-1, b"")  # the last page `scalar` read
        try:
            self.file_size = os.fstat(self._fh.fileno()).st_size
            self.header_size, header = self._read_header()
            self.metadata = self._parse_metadata(header.pop("__metadata__", None))
            self._tensors = self._parse_tensors(header)
        except BaseException:
            self._fh.close()
            raise

    # -- header ---------------------------------------------------------------------------------
    def _fail(self, why: str) -> InputError:
        return InputError(f"{self.path}: not a valid safetensors file: {why}")

    def _read_header(self) -> tuple[int, dict]:
        if self.file_size == 0:
            raise self._fail("the file is empty")
        if self.file_size < 8:
            raise self._fail(f"{self.file_size} bytes is too short for the 8-byte header length")
        (n,) = struct.unpack("<Q", self._fh.read(8))
        if n > MAX_HEADER_BYTES:
            raise self._fail(f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
        if n > self.file_size - 8:
            raise self._fail(f"header length {n} runs past the end of the {self.file_size}-byte file (truncated?)")
        raw = self._fh.read(n)
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
        except _DuplicateKey as exc:
            raise self._fail(f"duplicate tensor name {exc.args[0]!r} in the header") from None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise self._fail("the header is not JSON") from None
        if not isinstance(header, dict):
            raise self._fail("the header is not a JSON object")
        return n, header

    def _parse_metadata(self, meta: object) -> dict[str, str]:
        if meta is None:
            return {}
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise self._fail("__metadata__ must map strings to strings")
        return dict(meta)

    def _parse_tensors(self, header: dict) -> dict[str, TensorInfo]:
        data_len = self.file_size - 8 - self.header_size
        infos: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            if type(entry) is not dict:
                raise self._fail(f"entry for {name!r} is not an object")
            dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
            if dtype not in DTYPE_SIZES:
                raise self._fail(f"tensor {name!r} has unknown dtype {dtype!r}")
            if type(shape) is not list or (shape and (set(map(type, shape)) != _INT or min(shape) < 0)):
                raise self._fail(f"tensor {name!r} has an invalid shape {shape!r}")  # bools are not ints here
            if type(offsets) is not list or len(offsets) != 2 or set(map(type, offsets)) != _INT:
                raise self._fail(f"tensor {name!r} has invalid data_offsets {offsets!r}")
            begin, end = offsets
            if not 0 <= begin <= end:
                raise self._fail(f"tensor {name!r} has invalid data_offsets {offsets!r}")
            if end > data_len:
                raise self._fail(f"tensor {name!r} ends at byte {end}, past the {data_len}-byte data region")
            needed = math.prod(shape) * DTYPE_SIZES[dtype]
            if needed != end - begin:
                raise self._fail(
                    f"tensor {name!r}: {dtype} x {list(shape)} needs {needed} bytes, offsets give {end - begin}"
                )
            infos[name] = TensorInfo(name, dtype, tuple(shape), begin, end)
        position = 0
        ordered = sorted(infos.values(), key=_span)
        for info in ordered:
            if info.begin < position:
                raise self._fail(f"tensor {info.name!r} overlaps the tensor before it")
            if info.begin > position:
                raise self._fail(f"gap in the data region before tensor {info.name!r}")
            position = info.end
        if position != data_len:
            raise self._fail(f"the tensors cover {position} bytes of a {data_len}-byte data region")
        self._order = [info.name for info in ordered]
        return infos

    # -- access ---------------------------------------------------------------------------------
    @property
    def data_start(self) -> int:
        return 8 + self.header_size

    def keys(self) -> list[str]:
        """Tensor names in the order their bytes appear in the file (the order streaming reads want)."""
        return list(self._order)

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def info(self, name: str) -> TensorInfo:
        return self._tensors[name]

    def read_bytes(self, name: str) -> bytearray:
        info = self._tensors[name]
        return self.read_span(self.data_start + info.begin, info.nbytes, f"tensor {name!r}")

    def read_into(self, name: str, buffer: torch.Tensor) -> torch.Tensor:
        """Read a tensor into the front of a reusable uint8 `buffer`; returns a view of it.

        Reusing one buffer spares the page faults of a fresh allocation per tensor, which cost
        more than the read itself on large checkpoints.
        """
        info = self._tensors[name]
        view = memoryview(buffer.numpy()).cast("B")[: info.nbytes]
        offset, done = self.data_start + info.begin, 0
        while done < info.nbytes:
            n = _pread_into(self._fh, view[done:], offset + done)
            if n == 0:
                raise InputError(f"{self.path}: file shrank while reading tensor {name!r}")
            done += n
        if info.numel == 0:
            return torch.empty(info.shape, dtype=info.torch_dtype)
        flat = buffer[: info.nbytes].view(info.torch_dtype)
        if sys.byteorder != "little" and flat.element_size() > 1:
            flat = torch.from_numpy(flat.numpy().byteswap())
        return flat.reshape(info.shape)

    def read_span(self, offset: int, size: int, what: str = "tensor data") -> bytearray:
        """`size` bytes at absolute `offset`, read positionally (safe across threads)."""
        buf = bytearray(size)
        view = memoryview(buf)
        done = 0
        while done < size:
            n = _pread_into(self._fh, view[done:], offset + done)
            if n == 0:
                raise InputError(f"{self.path}: file shrank while reading {what}")
            done += n
        return buf

    def byte_range(self, name: str) -> tuple[int, int]:
        """(absolute file offset, length) of a tensor's bytes, for copies that bypass Python."""
        info = self._tensors[name]
        return self.data_start + info.begin, info.nbytes

    def fileno(self) -> int:
        return self._fh.fileno()

    def load(self, name: str) -> torch.Tensor:
        """Read one tensor's bytes from disk into a fresh CPU tensor."""
        return tensor_from_bytes(self.read_bytes(name), self._tensors[name])

    def scalar(self, name: str) -> float:
        """The first value of a tensor as float32 gives it (an alpha, a flag), decoded from its few
        bytes without building a tensor: reading a header's settings stays cheap."""
        info = self._tensors[name]
        if info.numel == 0:
            raise self._fail(f"tensor {name!r} is empty where one value was expected")
        raw = self._small_read(self.data_start + info.begin, DTYPE_SIZES[info.dtype], f"tensor {name!r}")
        if info.dtype == "BF16":  # the upper half of a float32
            return struct.unpack("<f", b"\0\0" + raw)[0]
        if info.dtype not in SCALAR_FORMATS:  # fp8
            return float(self.load(name).reshape(-1)[0].float())
        return as_float32(struct.unpack(SCALAR_FORMATS[info.dtype], raw)[0])

    def _small_read(self, offset: int, size: int, what: str) -> bytes:
        """A few bytes, served from the last page read when they lie in it: a file's settings
        (kohya's alphas) sit among small tensors, often many to a page, and a read costs a syscall."""
        page = offset - offset % PAGE
        at, data = self._last_page  # one tuple, so a reader in another thread never sees half of it
        if at != page:
            data = bytes(self.read_span(page, min(PAGE, self.file_size - page), what))
            self._last_page = (page, data)
        start = offset - page
        if start + size <= len(data):
            return data[start : start + size]
        return bytes(self.read_span(offset, size, what))

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pread_into(fh, view: memoryview, offset: int) -> int:
    """Positional read, so readers in other threads never move a shared file position."""
    if hasattr(os, "preadv"):
        return os.preadv(fh.fileno(), [view], offset)
    fh.seek(offset)  # pragma: no cover - platforms without preadv
    return fh.readinto(view)  # pragma: no cover


_INT = {int}


def _span(info: TensorInfo) -> tuple[int, int]:
    return info.begin, info.end


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(key for key, _ in pairs if key in seen or seen.add(key)))
    return out
