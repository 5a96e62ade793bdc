"""Reading the two checkpoints extract compares, in step: each job's weights in the update's
orientation (row blocks cut, transposed storage turned, swapped halves put back), the next job's
read while this one is decomposed."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from ..archs.locate import Location
from ..errors import ExtractError
from ..io.source import TensorSource
from ..lazy_torch import torch
from ..ops.fuse import reorder_rows
from .targets import Job

ARITHMETIC_DTYPES = ("F32", "F16", "BF16")  # stored dtypes torch computes in; fp8 is upcast first


def located_bytes(locations: tuple[Location, ...], source: TensorSource) -> int:
    """Bytes of the stored weights (or their row blocks) a job reads from one checkpoint."""
    total = 0
    for location in locations:
        info = source.info(location.key)
        rows = location.rows
        total += info.nbytes if rows is None else info.nbytes * (rows[1] - rows[0]) // max(info.shape[0], 1)
    return total


def read_ahead(
    jobs: list[Job], base: TensorSource, tuned: TensorSource, device: torch.device
) -> Iterator[tuple[Job, torch.Tensor, torch.Tensor]]:
    """Each job's two weights in canonical orientation on `device` (stored dtype, fp8 upcast);
    the next job's are read while the caller works on this one."""
    reader = _Reader(base, tuned, device)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(reader.pair, jobs[0]) if jobs else None
        for i, job in enumerate(jobs):
            w_base, w_tuned = pending.result()
            pending = pool.submit(reader.pair, jobs[i + 1]) if i + 1 < len(jobs) else None
            yield job, w_base, w_tuned


class _Reader:
    """Loads row blocks of checkpoint weights; the last whole tensor of each source is kept, so
    q, k and v cut from one fused weight read it once.

    A job whose weight is one stored tensor (every LLM layer) reads it into one of two reused
    buffers per source, taking turns: the caller works on one while the next job's fills the
    other. Fresh allocations would cost a page fault per 4 KiB, on the core the arithmetic needs.
    """

    def __init__(self, base: TensorSource, tuned: TensorSource, device: torch.device) -> None:
        self.sources = {"base": base, "tuned": tuned}
        self.device = device
        self.last: dict[str, tuple[str, torch.Tensor]] = {}
        self.buffers: dict[str, list[torch.Tensor]] = {"base": [], "tuned": []}
        self.turn = {"base": 0, "tuned": 0}  # the buffer the last tensor handed out lives in

    def pair(self, job: Job) -> tuple[torch.Tensor, torch.Tensor]:
        w_base = self.weight("base", job, job.base)
        w_tuned = self.weight("tuned", job, job.tuned)
        if w_base.shape != w_tuned.shape:
            raise ExtractError(
                f"{job.name}: BASE has it as {list(w_base.shape)} but TUNED as {list(w_tuned.shape)}; "
                "are both checkpoints of one model?"
            )
        return w_base, w_tuned

    def weight(self, which: str, job: Job, locations) -> torch.Tensor:
        blocks = []
        for location in locations:
            t = self.tensor(which, location.key, reuse=len(locations) == 1)
            if location.rows is not None:
                t = t[location.rows[0] : location.rows[1]]
            if location.transposed or job.type == "embedding":  # the update's (out, in) orientation
                t = t.T
            t = reorder_rows(t, job.swaps_rows, location.native_rows, False)  # to the canonical order
            blocks.append(t)
        return blocks[0].contiguous() if len(blocks) == 1 else torch.cat(blocks)

    def tensor(self, which: str, key: str, reuse: bool) -> torch.Tensor:
        cached = self.last.get(which)
        if cached is not None and cached[0] == key:
            return cached[1]
        ref = self.sources[which].ref(key)
        if reuse and self.device.type == "cpu" and ref.info.dtype in ARITHMETIC_DTYPES:
            t = ref.file.read_into(ref.name, self._other_buffer(which, ref.info.nbytes))
        else:
            t = ref.load()
            # Kept in its stored dtype (half the memory of fp32); fp8 has no arithmetic, so it is upcast.
            t = t.to(self.device, t.dtype if ref.info.dtype in ARITHMETIC_DTYPES else torch.float32)
        self.last[which] = (key, t)
        return t

    def _other_buffer(self, which: str, nbytes: int) -> torch.Tensor:
        """The buffer the caller is not working on, grown to `nbytes` when needed."""
        buffers = self.buffers[which]
        while len(buffers) < 2:
            buffers.append(torch.empty(0, dtype=torch.uint8))
        turn = 1 - self.turn[which]
        if buffers[turn].numel() < nbytes:
            buffers[turn] = torch.empty(0, dtype=torch.uint8)
            buffers[turn] = torch.empty(nbytes, dtype=torch.uint8)
        self.turn[which] = turn
        return buffers[turn]
