"""Streaming, atomic safetensors writers.

The header is written first (every tensor's dtype and shape is known before any data exists), then
tensors one at a time in declared order, so peak memory is one tensor whatever the model size.
Everything goes to a temporary file next to the destination (`atomic.py`), is fsynced and renamed
into place: a crash or an error leaves either the previous file or nothing, never a half-written one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import OutputError
from ..lazy_torch import torch
from .atomic import atomic_write_text, fsync_dir, temp_file_next_to
from .safetensors_file import DTYPE_NAMES, SafetensorsFile, dtype_size

# The data-region hash kohya tools store in metadata; written as a fixed-width placeholder and
# patched in place once the data is written, so the header can still go first.
HASH_KEY = "sshs_model_hash"
_HASH_PLACEHOLDER = "0" * 64
# A1111's older hash: sha256 of 64 KiB at 1 MiB into the file, first 8 hex digits.
LEGACY_HASH_KEY = "sshs_legacy_hash"
_LEGACY_PLACEHOLDER = "0" * 8
LEGACY_HASH_SPAN = (0x100000, 0x10000)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # safetensors dtype name, e.g. "F16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = dtype_size(self.dtype)
        for d in self.shape:
            n *= d
        return n

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorSpec:
        return cls(name, DTYPE_NAMES[tensor.dtype], tuple(tensor.shape))


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The little-endian bytes safetensors stores for a tensor, without an extra copy when possible."""
    t = tensor.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def encode_header(specs: Iterable[TensorSpec], metadata: dict[str, str] | None) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for spec in specs:
        if spec.name in header:
            raise ValueError(f"duplicate tensor name {spec.name!r}")
        header[spec.name] = {
            "dtype": spec.dtype,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)  # pad so the data region starts 8-byte aligned, as safetensors does


_COPY_CHUNK = 16 << 20
# copy_file_range refuses some file pairs (other filesystems, old kernels); plain reads take over.
_NO_KERNEL_COPY = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF)


def _copy_in_kernel(src_fd: int, dst, offset: int, size: int, start: int) -> bool:
    """Copy `size` bytes at `offset` of `src_fd` to `start` of `dst`; False when the kernel cannot."""
    done = 0
    try:
        while done < size:
            n = os.copy_file_range(src_fd, dst.fileno(), size - done, offset + done, start + done)
            if n == 0:  # some filesystems copy nothing instead of failing; plain reads start over
                return False
            done += n
    except OSError as exc:
        if exc.errno in _NO_KERNEL_COPY:
            return False
        raise
    dst.seek(start + size)
    return True


class SafetensorsWriter:
    """One output file: header on open, `write` each tensor in order, `commit` renames into place."""

    def __init__(
        self,
        path: str | os.PathLike,
        specs: list[TensorSpec],
        metadata: dict[str, str] | None = None,
        *,
        record_hash: bool = False,
        record_legacy_hash: bool = False,
    ) -> None:
        self.path = Path(path)
        self._specs = list(specs)
        self._next = 0
        metadata = dict(metadata or {})
        if record_hash:
            metadata[HASH_KEY] = _HASH_PLACEHOLDER
        if record_legacy_hash:
            metadata[LEGACY_HASH_KEY] = _LEGACY_PLACEHOLDER
        self._sha = hashlib.sha256() if record_hash else None
        self._kernel_copy = hasattr(os, "copy_file_range")
        header = encode_header(self._specs, metadata)
        if record_legacy_hash and 8 + len(header) > LEGACY_HASH_SPAN[0]:
            raise OutputError(f"{self.path}: header over 1 MiB: {LEGACY_HASH_KEY} would hash its own bytes")
        self._legacy = record_legacy_hash
        fd, self._tmp = temp_file_next_to(self.path)
        self._fh = os.fdopen(fd, "wb")
        self._header = header
        self._closed = False
        try:
            self._fh.write(len(header).to_bytes(8, "little"))
            self._fh.write(header)
        except OSError as exc:
            self.abort()
            raise OutputError(f"{self.path}: write failed ({exc.strerror})") from None

    @property
    def pending(self) -> list[TensorSpec]:
        return self._specs[self._next :]

    def _expect(self, name: str, dtype: str, shape: tuple[int, ...]) -> TensorSpec:
        if self._next >= len(self._specs):
            raise ValueError(f"tensor {name!r} written after all declared tensors")
        spec = self._specs[self._next]
        if (spec.name, spec.dtype, spec.shape) != (name, dtype, shape):
            raise ValueError(f"expected {spec} next, got {name!r} {dtype} {list(shape)}")
        return spec

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._expect(name, DTYPE_NAMES[tensor.dtype], tuple(tensor.shape))
        self._emit(tensor_bytes(tensor))

    def write_parts(self, name: str, dtype: str, shape: tuple[int, ...], parts: Iterator[torch.Tensor]) -> None:
        """Write one tensor from consecutive pieces of it (blocks of rows, in order), so no buffer the
        size of the whole tensor is needed; the pieces must add up to exactly its declared bytes."""
        spec = self._expect(name, dtype, tuple(shape))
        written = 0
        for part in parts:
            data = tensor_bytes(part)
            written += len(data)
            self._emit_part(data)
        if written != spec.nbytes:
            self.abort()
            raise ValueError(f"{name!r}: {written} bytes written in parts, {spec.nbytes} declared")
        self._next += 1

    def write_raw(self, name: str, data: bytes | bytearray | memoryview, dtype: str, shape: tuple[int, ...]) -> None:
        """Copy a tensor's stored bytes unchanged (no decode, no re-encode)."""
        spec = self._expect(name, dtype, tuple(shape))
        if len(data) != spec.nbytes:
            raise ValueError(f"{name!r}: {len(data)} bytes given, {spec.nbytes} declared")
        self._emit(data)

    def write_from(self, name: str, source: SafetensorsFile, key: str) -> None:
        """Copy a tensor's bytes from another safetensors file unchanged.

        The kernel copies file to file (`copy_file_range`) when no hash needs the bytes, so
        passing a tensor through costs no memory and no Python-level copy.
        """
        info = source.info(key)
        self._expect(name, info.dtype, info.shape)
        offset, size = source.byte_range(key)
        try:
            self._fh.flush()
            start = self._fh.tell()
            if (
                self._sha is None
                and self._kernel_copy
                and _copy_in_kernel(source.fileno(), self._fh, offset, size, start)
            ):
                self._next += 1
                return
            self._kernel_copy = False
            self._fh.seek(start)
        except OSError as exc:
            self.abort()
            raise OutputError(f"{self.path}: write failed ({exc.strerror})") from None
        done = 0
        while done < size:
            chunk = source.read_span(offset + done, min(_COPY_CHUNK, size - done))
            self._emit_part(chunk)
            done += len(chunk)
        self._next += 1

    def _emit(self, data: bytes | bytearray | memoryview) -> None:
        self._emit_part(data)
        self._next += 1

    def _emit_part(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self._fh.write(data)
        except OSError as exc:
            self.abort()
            raise OutputError(f"{self.path}: write failed ({exc.strerror})") from None
        if self._sha is not None:
            self._sha.update(data)

    def commit(self) -> Path:
        self.finish()
        return self.publish()

    def finish(self) -> None:
        """Check every tensor was written, patch the hash, and make the temporary file durable."""
        if self._next != len(self._specs):
            missing = ", ".join(s.name for s in self.pending[:3])
            self.abort()
            raise ValueError(f"{self.path}: {len(self._specs) - self._next} declared tensors never written ({missing})")
        try:
            if self._sha is not None:
                self._patch(HASH_KEY, _HASH_PLACEHOLDER, self._sha.hexdigest())
            if self._legacy:
                self._patch(LEGACY_HASH_KEY, _LEGACY_PLACEHOLDER, self._legacy_digest())
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._closed = True
        except OSError as exc:
            self.abort()
            raise OutputError(f"{self.path}: could not finish writing ({exc.strerror})") from None

    def publish(self) -> Path:
        """Rename the finished file into place (atomic on one filesystem)."""
        try:
            os.replace(self._tmp, self.path)
        except OSError as exc:
            self.abort()
            raise OutputError(f"{self.path}: could not move the finished file into place ({exc.strerror})") from None
        fsync_dir(self.path.parent)
        return self.path

    def _legacy_digest(self) -> str:
        self._fh.flush()
        offset, size = LEGACY_HASH_SPAN
        with open(self._tmp, "rb") as fh:
            fh.seek(offset)
            return hashlib.sha256(fh.read(size)).hexdigest()[:8]

    def _patch(self, key: str, placeholder: str, digest: str) -> None:
        marker = f'"{key}":"{placeholder}"'.encode()
        pos = self._header.index(marker) + len(marker) - 1 - len(placeholder)
        self._fh.flush()
        self._fh.seek(8 + pos)
        self._fh.write(digest.encode())
        self._fh.seek(0, os.SEEK_END)

    def abort(self) -> None:
        """Drop the temporary file; the destination is left as it was."""
        if not self._closed:
            with contextlib.suppress(OSError):
                self._fh.close()
            self._closed = True
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.commit()


def shard_plan(specs: list[TensorSpec], max_bytes: int, stem: str = "model") -> list[tuple[str, list[TensorSpec]]]:
    """HF-style shards (`model-00001-of-00003.safetensors`) filled in order up to `max_bytes` each."""
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if groups[-1] and size + spec.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    n = len(groups)
    return [(f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


class ShardedWriter:
    """Several shard files plus an HF `*.safetensors.index.json`; the index is written last."""

    def __init__(
        self,
        directory: str | os.PathLike,
        shards: list[tuple[str, list[TensorSpec]]],
        index_name: str,
        metadata: dict[str, str] | list[dict[str, str]] | None = None,
        index_metadata: dict[str, object] | None = None,
    ) -> None:
        """`metadata`: one header metadata for every shard, or one per shard."""
        self.directory = Path(directory)
        self._index_path = self.directory / index_name
        self._owner: dict[str, SafetensorsWriter] = {}
        self._writers: list[SafetensorsWriter] = []
        per_shard = metadata if isinstance(metadata, list) else [metadata] * len(shards)
        try:
            for (filename, specs), meta in zip(shards, per_shard, strict=True):
                writer = SafetensorsWriter(self.directory / filename, specs, meta)
                self._writers.append(writer)
                self._owner.update({s.name: writer for s in specs})
        except BaseException:
            self.abort()
            raise
        self._committed = False
        total = sum(s.nbytes for _, specs in shards for s in specs)
        self._index = {
            "metadata": {**(index_metadata or {}), "total_size": total},
            "weight_map": {s.name: filename for filename, specs in shards for s in specs},
        }

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._owner[name].write(name, tensor)

    def write_raw(self, name: str, data: bytes | bytearray | memoryview, dtype: str, shape: tuple[int, ...]) -> None:
        self._owner[name].write_raw(name, data, dtype, shape)

    def write_parts(self, name: str, dtype: str, shape: tuple[int, ...], parts: Iterator[torch.Tensor]) -> None:
        self._owner[name].write_parts(name, dtype, shape, parts)

    def write_from(self, name: str, source: SafetensorsFile, key: str) -> None:
        self._owner[name].write_from(name, source, key)

    def commit(self) -> Path:
        """Finish every shard before any is renamed, so a failure while writing leaves nothing new."""
        try:
            for writer in self._writers:
                writer.finish()
            for writer in self._writers:
                writer.publish()
            atomic_write_text(self._index_path, json.dumps(self._index, indent=2) + "\n")
        except BaseException:
            self.abort()
            raise
        self._committed = True
        return self._index_path

    def abort(self) -> None:
        for writer in self._writers:
            writer.abort()

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._committed:
            self.commit()
