"""merge's streamed walk: every base tensor in file order, patched on the device or copied as it is.

A tensor no patch touches is copied by the kernel. A patched one is read (the next one ahead, in a
background thread, into a reused buffer), upcast, updated a block of rows at a time (whole on a GPU,
or where the update is not row-local in storage order), range-checked, and cast once. A scaled fp8
weight (scaled.py) is dequantized first and quantized again under a fresh scale, which is written
wherever its scale tensor comes in the file, before or after the weight.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import MergeError
from ..io.safetensors_file import DTYPES
from ..io.writer import HASH_KEY, LEGACY_HASH_KEY, SafetensorsWriter, ShardedWriter, TensorSpec
from ..kinds import dora
from ..lazy_torch import torch
from ..ops.fuse import swap_halves
from ..ops.merge import add_update, fits, update_view
from ..progress import Progress, Tally
from .match import LoraMatch, Patch
from .output import Entry, OutFile, OutputPlan, WeightSet, output_dtype
from .scaled import dequantize, quantize

ROW_BLOCK_ELEMENTS = 1 << 19  # 2 MiB of fp32 per block of rows: stays in cache on common CPUs


@dataclass
class _Factors:
    """A module's update on the device, in fp32: `up` (rows, r) and `down` (r, in * kh * kw) for a
    low-rank kind, or the dense update itself as `up` (rows, in * kh * kw) with `down` None (LoHa,
    LoKr: their products are not low-rank factors). A kind that reads the base keeps its `tensors`
    instead: its update is computed against each weight it meets."""

    up: torch.Tensor | None
    down: torch.Tensor | None
    bias: torch.Tensor | None
    tensors: dict[str, torch.Tensor] | None
    magnitude: dora.Magnitude | None  # DoRA


class MergeWalk:
    """Streams weight sets out, applying each base tensor's patches as it passes."""

    def __init__(
        self,
        plan: OutputPlan,
        matches: list[LoraMatch],
        device: torch.device,
        out_dtype: str | None,
        progress: Progress | None,
        scaled: dict[str, tuple[str, torch.Tensor]] | None = None,
    ) -> None:
        """`scaled`: each scaled fp8 weight's scale key and value."""
        self.matches = matches
        self.device = device
        self.out_dtype = out_dtype
        self.patches: dict[str, list[Patch]] = {}
        self.widened: dict[str, tuple[int, ...]] = {}  # base key -> its shape once zero columns are added
        for m in matches:
            for p in m.patches:
                self.patches.setdefault(p.key, []).append(p)
                if p.widen is not None:
                    wider = max(self.widened.get(p.key, p.widen), p.widen, key=lambda s: s[1])
                    self.widened[p.key] = wider
        # A module's factors stay on the device from its first patch to its last (fused modules
        # merged into a diffusers folder touch several tensors).
        self._uses = Counter(id(p.module) for ps in self.patches.values() for p in ps if p.module is not None)
        self._factors: dict[int, _Factors] = {}
        self.scales = {weight: value for weight, (_, value) in (scaled or {}).items()}
        # Scale key -> its weight, for the weights quantized again (updated, no --dtype).
        self.rescaled = {
            key: weight for weight, (key, _) in (scaled or {}).items() if weight in self.patches and out_dtype is None
        }
        self._entries = {e.key: e for wset in plan.sets for f in wset.files for e in f.entries}
        self._requantized: dict[str, list] = {}  # weight -> [values, scale, writes left]
        self.updated = self.copied = self.cast = self.files = 0
        self._out: torch.Tensor | None = None
        specs = [self._spec(e) for wset in plan.sets for f in wset.files for e in f.entries]
        self.tally = Tally(progress, len(specs), sum(s.nbytes for s in specs))

    def _spec(self, entry: Entry) -> TensorSpec:
        info = entry.file.info(entry.name)
        shape = self.widened.get(entry.key, info.shape)
        return TensorSpec(entry.name, output_dtype(info.dtype, self.out_dtype), shape)

    def write_file(self, out: OutFile, path: Path) -> None:
        specs = [self._spec(e) for e in out.entries]
        meta = out.metadata
        with SafetensorsWriter(
            path, specs, meta, record_hash=HASH_KEY in meta, record_legacy_hash=LEGACY_HASH_KEY in meta
        ) as writer:
            self._stream(writer, out.entries, specs)
        self.files += 1

    def write_set(self, wset: WeightSet, root: Path) -> None:
        directory = root / wset.directory
        directory.mkdir(parents=True, exist_ok=True)
        if wset.index is None:
            for out in wset.files:
                self.write_file(out, directory / out.name)
            return
        shards = [(out.name, [self._spec(e) for e in out.entries]) for out in wset.files]
        # A whole-file hash describes no shard; ShardedWriter does not compute per-shard ones.
        metadata = [
            {k: v for k, v in out.metadata.items() if k not in (HASH_KEY, LEGACY_HASH_KEY)} for out in wset.files
        ]
        with ShardedWriter(directory, shards, wset.index, metadata, wset.index_metadata) as writer:
            entries = [e for out in wset.files for e in out.entries]
            self._stream(writer, entries, [s for _, specs in shards for s in specs])
        self.files += len(wset.files) + 1

    def _stream(self, writer: SafetensorsWriter | ShardedWriter, entries: list[Entry], specs: list[TensorSpec]) -> None:
        with ThreadPoolExecutor(max_workers=1) as reader:
            ahead = self._read_ahead(reader, entries)
            for entry, spec in zip(entries, specs, strict=True):
                info = entry.file.info(entry.name)
                patches = self.patches.get(entry.key)
                if entry.key in self.rescaled:
                    scale = self._requantized_part(self.rescaled[entry.key], 1)
                    writer.write(spec.name, scale.reshape(spec.shape).to(DTYPES[spec.dtype]))
                    self.updated += 1
                elif entry.key in self.scales and (patches or self.out_dtype):
                    if self.out_dtype is None:
                        writer.write(spec.name, self._requantized_part(entry.key, 0))
                    else:
                        writer.write(spec.name, self._cast(entry.key, self._dequantized(entry.key), DTYPES[spec.dtype]))
                    self.updated += bool(patches)
                    self.cast += not patches
                elif patches:
                    stored = next(ahead).result()
                    if self._by_rows(entry.key, stored, patches):  # no buffer the size of the tensor
                        rows = self._merged_rows(entry.key, stored, patches, DTYPES[spec.dtype])
                        writer.write_parts(spec.name, spec.dtype, spec.shape, rows)
                        for patch in patches:
                            self._release(patch)
                    else:
                        out = self._out_buffer(spec)
                        self._merge_into(out, entry.key, stored, patches)
                        writer.write(spec.name, out)
                    self.updated += 1
                elif spec.dtype == info.dtype:
                    writer.write_from(spec.name, entry.file, entry.name)
                    self.copied += 1
                else:
                    writer.write(spec.name, self._cast(entry.key, entry.file.load(entry.name), DTYPES[spec.dtype]))
                    self.cast += 1
                self.tally.advance(spec.nbytes)

    def _read_ahead(self, reader: ThreadPoolExecutor, entries: list[Entry]) -> Iterator[Future[torch.Tensor]]:
        """The updated tensors, in order, each read into one of two reused buffers while the
        previous one is computed."""
        todo = [e for e in entries if e.key in self.patches and e.key not in self.scales]
        largest = max((e.file.info(e.name).nbytes for e in todo), default=0)
        buffers = [torch.empty(largest, dtype=torch.uint8) for _ in range(min(2, len(todo)))]
        pending = None
        for i, entry in enumerate(todo):
            current = pending or reader.submit(entry.file.read_into, entry.name, buffers[i % 2])
            following = todo[i + 1] if i + 1 < len(todo) else None
            pending = (
                reader.submit(following.file.read_into, following.name, buffers[(i + 1) % 2]) if following else None
            )
            yield current

    def _dequantized(self, key: str) -> torch.Tensor:
        """A scaled fp8 weight's real values in fp32, with its patches applied."""
        entry = self._entries[key]
        weight = dequantize(entry.file.load(entry.name), self.scales[key])
        patches = self.patches.get(key)
        if not patches:
            return weight
        out = torch.empty(self.widened.get(key, weight.shape), dtype=torch.float32)
        self._merge_into(out, key, weight, patches)
        return out

    def _requantized_part(self, key: str, part: int) -> torch.Tensor:
        """The fp8 values (part 0) or the fresh scale (part 1) of an updated scaled weight, computed
        for whichever of the two the file holds first and kept until the other is written."""
        if key not in self._requantized:
            stored = DTYPES[self._entries[key].file.info(self._entries[key].name).dtype]
            self._requantized[key] = [*quantize(self._dequantized(key), stored), 2]
        held = self._requantized[key]
        held[2] -= 1
        if held[2] == 0:
            del self._requantized[key]
        return held[part]

    def _out_buffer(self, spec: TensorSpec) -> torch.Tensor:
        """One reused output buffer (the writer has copied its bytes out before the next tensor)."""
        if self._out is None or self._out.numel() < spec.nbytes:
            self._out = None
            self._out = torch.empty(spec.nbytes, dtype=torch.uint8)
        return self._out[: spec.nbytes].view(DTYPES[spec.dtype]).reshape(spec.shape)

    def _merge_into(self, out: torch.Tensor, key: str, stored: torch.Tensor, patches: list[Patch]) -> None:
        if key in self.widened:  # the base's columns, then zeros for the channels a LoRA adds
            weight = torch.zeros(self.widened[key], device=self.device, dtype=torch.float32)
            weight[:, : stored.shape[1]] = stored.to(device=self.device, dtype=torch.float32)
            for patch in patches:
                self._apply(weight if patch.widen else weight[:, : stored.shape[1]], patch)
            self._check(weight, key, patches, out.dtype)
            out.copy_(weight)
        elif self._by_rows(key, stored, patches):
            flat = out.view(stored.shape[0], -1)
            start = 0
            for block in self._merged_rows(key, stored, patches, out.dtype):
                flat[start : start + block.shape[0]].copy_(block)
                start += block.shape[0]
        else:
            weight = stored.to(device=self.device, dtype=torch.float32)
            for patch in patches:
                self._apply(weight, patch)
            self._check(weight, key, patches, out.dtype)
            out.copy_(weight)
        for patch in patches:
            self._release(patch)

    def _by_rows(self, key: str, stored: torch.Tensor, patches: list[Patch]) -> bool:
        """Whether the tensor is merged a block of rows at a time (on the CPU, rows patched alone)."""
        local = all(_row_local(p) for p in patches)
        return self.device.type == "cpu" and stored.dim() >= 1 and key not in self.widened and local

    def _merged_rows(
        self, key: str, stored: torch.Tensor, patches: list[Patch], dtype: torch.dtype
    ) -> Iterator[torch.Tensor]:
        """The merged tensor in blocks of rows small enough to stay in the CPU cache (flattened to
        2-D), each upcast, updated by every patch's rows, checked and cast to `dtype`: several
        times faster than whole-tensor passes on large weights, and nothing the tensor's size is
        held."""
        rows = stored.shape[0]
        block = max(1, ROW_BLOCK_ELEMENTS // max(1, stored[0].numel()))
        plans = []
        for patch in patches:
            up, down = self._rows_of(patch)
            first = patch.rows[0] if patch.rows else 0
            plans.append((first, first + up.shape[0], up, down, self.matches[patch.lora].strength * patch.module.scale))
        flat_in = stored.reshape(rows, -1)
        for start in range(0, rows, block):
            stop = min(rows, start + block)
            weight = flat_in[start:stop].float()
            for first, last, up, down, factor in plans:
                a, b = max(first, start), min(last, stop)
                if a < b:
                    add_update(weight[a - start : b - start], up[a - first : b - first], down, factor)
            self._check(weight, key, patches, dtype)
            yield weight.to(dtype)

    def _rows_of(self, patch: Patch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The module's up rows (or dense update rows) that land in this patch's block, in the base's
        row order, and down (None for a dense update)."""
        factors = self._factors_of(patch)
        return _module_rows(patch, factors.up), factors.down

    def _check(self, weight: torch.Tensor, key: str, patches: list[Patch], out: torch.dtype) -> None:
        if not fits(weight, out):
            names = ", ".join(dict.fromkeys(p.name for p in patches))
            raise MergeError(f"{key}: {_bad_values(weight, out)} after merging {names}; nothing was written")

    def _cast(self, key: str, stored: torch.Tensor, out: torch.dtype) -> torch.Tensor:
        narrower = out.is_floating_point and torch.finfo(out).max < torch.finfo(stored.dtype).max
        if narrower and not fits(stored.float(), out):
            raise MergeError(f"{key}: {_bad_values(stored.float(), out)} when cast to {out}; nothing was written")
        return stored.to(out)

    def _apply(self, weight: torch.Tensor, patch: Patch) -> None:
        strength = self.matches[patch.lora].strength
        if patch.role == "replace":
            saved = self.matches[patch.lora].adapter.load(patch.replacement)
            weight.lerp_(saved.to(device=self.device, dtype=torch.float32), strength)
            return
        module = patch.module
        factors = self._factors_of(patch)
        if patch.role == "bias":
            target = weight if patch.rows is None else weight[patch.rows[0] : patch.rows[1]]
            target.add_(
                _module_rows(patch, factors.bias), alpha=strength * (1.0 if module.bias_unscaled else module.scale)
            )
            return
        target = update_view(weight, patch.transposed, patch.rows)
        magnitude = factors.magnitude
        if magnitude is None:
            self._add(target, patch, factors, strength * module.scale)
            return
        merged = target.clone()  # V, with the update at full strength: DoRA's strength acts on the rescale
        self._add(merged, patch, factors, module.scale)
        values = magnitude.values if magnitude.columns else _module_rows(patch, magnitude.values)
        dora.apply(target, merged, values, strength, columns=magnitude.columns, lycoris=magnitude.lycoris)

    def _add(self, target: torch.Tensor, patch: Patch, factors: _Factors, factor: float) -> None:
        """target += factor * the module's update for these rows."""
        kind = patch.module.kind
        if factors.tensors is None:
            up, down = self._rows_of(patch)
            add_update(target, up, down, factor)
            return
        rows = kind.output_rows(factors.tensors)
        tensors = {role: _module_rows(patch, t) if role in rows else t for role, t in factors.tensors.items()}
        if kind.strength_inside:
            target.copy_(kind.merged(tensors, target, factor))
        else:
            target.add_(kind.delta(tensors, target), alpha=factor)

    def _factors_of(self, patch: Patch) -> _Factors:
        module = patch.module
        cached = self._factors.get(id(module))
        if cached is not None:
            return cached
        adapter = self.matches[patch.lora].adapter
        tensors = adapter.tensors(module)

        def on_device(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=self.device, dtype=torch.float32).reshape(-1)

        magnitude = None
        if module.dora_key is not None:
            values = on_device(adapter.load(module.dora_key))
            magnitude = dora.Magnitude.of(module.dora_key, module.dora_shape, values)
        bias = on_device(tensors.get("bias"))
        if module.kind.reads_base:
            on = {role: t.to(device=self.device, dtype=torch.float32) for role, t in tensors.items()}
            factors = _Factors(None, None, bias, on, magnitude)
        else:
            low = module.kind.low_rank(tensors)
            if low is None:
                dense = module.kind.delta(tensors)
                low = (dense.reshape(dense.shape[0], -1), None)
            up, down = low
            factors = _Factors(
                up.to(self.device), None if down is None else down.to(self.device), bias, None, magnitude
            )
        self._factors[id(module)] = factors
        return factors

    def _release(self, patch: Patch) -> None:
        """The last patch of a module (weight or bias, in whatever order they come) frees its factors."""
        if patch.module is None:
            return
        key = id(patch.module)
        self._uses[key] -= 1
        if self._uses[key] <= 0:
            self._factors.pop(key, None)


def _row_local(patch: Patch) -> bool:
    """Whether a patch adds precomputed rows to each stored row on its own (no transposed storage,
    no norms, no update computed from the base)."""
    module = patch.module
    return patch.role == "weight" and not patch.transposed and module.dora_key is None and not module.kind.reads_base


def _module_rows(patch: Patch, rows: torch.Tensor) -> torch.Tensor:
    """The rows of a tensor indexed by the module's output rows that land in this patch's block,
    in the base's row order."""
    if patch.up_rows is not None:
        rows = rows[patch.up_rows[0] : patch.up_rows[1]]
    return swap_halves(rows) if patch.swap_halves else rows


def _bad_values(t: torch.Tensor, dtype: torch.dtype) -> str:
    if not bool(torch.isfinite(t).all()):
        return "non-finite values (inf or NaN)"
    return f"values up to {float(t.abs().max()):.6g}, beyond {dtype}'s range ({torch.finfo(dtype).max:.6g})"
