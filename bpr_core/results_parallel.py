"""A large plain results JSON read by several processes at once: the same rows as the sequential
columnar reader (`results_arrow`, whose chunk functions do the reading), in the list's order.

The file is cut into byte ranges, one reader per range. Only the first range starts where an entry
is known to start (after the list's `[`); every other range's reader guesses: the first `{` in its
range that follows a `}`, a comma and blanks. A guess can be wrong (that text inside a string, or
between two objects of a nested list), so a range's rows count only once the range before it has
been accepted: each reader reads on past its range's end, to the end of the entry that straddles
it (cut out exactly, as the sequential reader cuts an entry), which gives exactly where the next
entry starts. A range whose guess is that offset is accepted; any other is read again from it. By
induction every accepted range started at a real entry start and was read exactly as the
sequential reader reads it; positions count on in range order.

Anything else (a chunk that needs the exact scan whole, a list that is malformed or ends early, a
reader process that fails) hands the rest of the file, from the last entry start known, to the
sequential reader, which reads it as it always did (and names what is malformed as it always did).

Why processes: the reading is ~1 us of CPU per small entry and ~3 us with a detector's box (see
results_arrow), on the refinement job's driver, once per input instance; with readers beside it
the driver process only routes the rows, and the reading scales with the head node's cores.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import BrokenExecutor, Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from .formats import InputError
from .results_arrow import _SEPARATOR_RE, _WS, MAX_ENTRY_CHARS, ROW_SCHEMA, _entries, _Exact, _fast_chunk, _first_end

# Smaller files are read in the calling process. Measured on 2 cores (jobs.bench_inputs, readers
# forced): the readers' start (~0.4 s each) and the hand-over of their rows cost more than they
# save on a 128 MB file (1.35 s against 0.86 s), break even around 256 MB (2.46 against 2.68 s,
# detectron2's entries) and gain from ~1 GB (6.6-7.1 s against 9.0-9.2 s); beside the job's
# listing of the images, the 213 and 380 MB files of bench.driver's 2M instances took longer with
# readers (3.6 s against 2.2 s, 6.1 against 5.8 s).
MIN_BYTES = 512 << 20
# Bytes per range: 4 ranges per reader (so the last ones leave no reader idle for long), between
# these bounds (a range's rows come back as one table).
RANGE_BYTES, MIN_RANGE_BYTES = 32 << 20, 4 << 20
MAX_WORKERS = 8
LOOKBACK = 4096  # bytes before a range's start searched for the `}` and comma of a separator
_RAW = "_raw"  # an entry a reader cut out whole: its text, read into a row by the caller (positions are its)


@dataclass
class RangeRead:
    start: int | None  # where the reading started; None: no entry start was guessed in the range
    ok: bool = True  # False: the sequential reader has to take over from `start`
    table: pa.Table | None = None  # the rows the columns vouch for, positions from 0
    others: list[dict] = field(default_factory=list)  # {"position", _RAW: the entry's text}, in order
    n: int = 0  # entries read
    next: int | None = None  # where the entry after the last one read starts; None: the list ended there


@dataclass(frozen=True)
class FileOpener:
    """Opens a file of a pyarrow filesystem for random access (picklable: sent to the readers)."""

    fs: object
    path: str

    def __call__(self):
        return self.fs.open_input_file(self.path)


def _read_whole(text, position: int) -> dict:
    return {"position": position, _RAW: text}


def guess_start(f, start: int, end: int) -> int | None:
    """The first `{` at or after `start` and before `end` that follows `}`, a comma and blanks."""
    pos = max(0, start - LOOKBACK)
    f.seek(pos)
    buf = b""
    while True:
        data = f.read(1 << 16)
        buf += data
        for m in _SEPARATOR_RE.finditer(buf):
            brace = pos + m.end() - 1
            if brace >= end:
                return None
            if brace >= start:
                return brace
        if not data or pos + len(buf) >= end:
            return None
        keep = buf[-LOOKBACK:]  # a separator may continue into the next read
        pos, buf = pos + len(buf) - len(keep), keep


def read_range(opener: Callable, start: int, end: int, size: int, chunk_bytes: int, verified: bool) -> RangeRead:
    """In a reader: the entries that start in [start, end) of the file `opener()` opens (random
    access), the first at `start` if `verified`, else at the guessed start."""
    with opener() as f:
        if not verified:
            start = guess_start(f, start, end)
            if start is None:
                return RangeRead(None)
        try:
            return _read(f, start, end, size, chunk_bytes)
        except _Exact:
            return RangeRead(start, ok=False)


def _read(f, start: int, end: int, size: int, chunk_bytes: int) -> RangeRead:
    """The entries that start in [start, end), the first at `start`, and where the next one starts."""
    f.seek(start)
    out = RangeRead(start)
    tables = []
    carry, at = b"", start  # `at`: the file offset of carry's first byte
    while True:
        want = end - (at + len(carry))
        data = f.read(min(max(chunk_bytes, len(carry)), want)) if want > 0 else b""
        if want > 0 and not data:
            return RangeRead(start, ok=False)  # shorter than when it was planned: the sequential reader names it
        buf = carry + data
        last = at + len(buf) >= end
        eof = last and end >= size
        fast = _fast_chunk(buf, eof, out.n, _read_whole)
        if fast is None:
            return RangeRead(start, ok=False)
        table, others, n, carry = fast
        tables.append(table)
        out.others += others
        out.n += n
        at += len(buf) - len(carry)
        if eof:
            out.table = pa.concat_tables(tables)
            return out  # the list ended (next None)
        if last:
            break
    out.table = pa.concat_tables(tables)
    # The entry that starts before `end` and ends at or after it: cut out exactly, read whole.
    if not carry.startswith(b"{"):
        return RangeRead(start, ok=False)
    buf = carry
    while True:
        term = _first_end(buf, 0)
        if term is not None:
            break
        more = f.read(max(chunk_bytes, len(buf)))
        if not more or len(buf) > MAX_ENTRY_CHARS:
            return RangeRead(start, ok=False)  # not closed, or over the bound: the sequential reader names it
        buf += more
    out.others.append(_read_whole(buf[:term], out.n))
    out.n += 1
    rest = buf[term + 1:]
    if buf[term] == ord("]"):  # the list ends here: blanks may follow, nothing else
        while rest:
            if rest.strip(_WS):
                return RangeRead(start, ok=False)
            rest = f.read(chunk_bytes)
        return out
    nxt = at + term + 1
    while not rest.lstrip(_WS):  # blanks to the buffer's end: read on
        nxt += len(rest)
        rest = f.read(chunk_bytes)
        if not rest:
            return RangeRead(start, ok=False)  # the list is not closed
    out.next = nxt + len(rest) - len(rest.lstrip(_WS))
    return out


def plan(opener: Callable, min_bytes: int | None = None) -> tuple[int, int] | None:
    """(size, where the list's first entry may start) for a plain UTF-8 file of at least min_bytes
    that holds a list; None for anything else (gzip, a GT-style object, a small file)."""
    with opener() as f:
        size = f.seek(0, 2)
        if size < (MIN_BYTES if min_bytes is None else min_bytes):
            return None
        f.seek(0)
        head = f.read(1 << 16)
    skip = 3 if head.startswith(b"\xef\xbb\xbf") else 0
    body = head[skip:].lstrip(_WS)
    if not body.startswith(b"["):
        return None
    return size, len(head) - len(body) + 1


def default_workers() -> int:
    """Reader processes: BPR_JSON_READERS if set (1: read in the calling process), else one per
    core, at most MAX_WORKERS."""
    env = os.environ.get("BPR_JSON_READERS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise InputError(f"BPR_JSON_READERS={env!r}: expected a whole number of reader processes, 1 or more")
        return int(env)
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


def _placed(read: RangeRead, offset: int, read_one: Callable) -> tuple[pa.Table, list[dict]]:
    """A range's rows with their positions in the file (its entries come after `offset` others)."""
    table = read.table if read.table is not None else ROW_SCHEMA.empty_table()
    if offset and table.num_rows:
        for name in ("instance_id", "position"):
            i = table.schema.get_field_index(name)
            table = table.set_column(i, ROW_SCHEMA.field(name), pc.add(table[name], offset))
    return table, [read_one(o[_RAW], offset + o["position"]) for o in read.others]


def iter_ranges(opener: Callable, size: int, body_start: int, read_one: Callable, chunk_bytes: int, done: list[int],
                workers: int, range_bytes: int | None = None, executor: Executor | None = None,
                stats: dict | None = None) -> Iterator[tuple[pa.Table, list[dict]]]:
    """The list's entries as `results_arrow._entries` gives them (done[0] counts those given),
    read by `workers` processes (or by `executor`), `workers` + 1 ranges in flight. `stats` (if
    given) counts the ranges accepted as read, read again from the real start, and holding no
    entry start, and the offset where the sequential reader took over (None: it did not)."""
    stats = stats if stats is not None else {}
    stats.update(ranges=0, accepted=0, read_again=0, empty=0, handover_at=None)
    range_bytes = range_bytes or max(MIN_RANGE_BYTES, min(RANGE_BYTES, size // (4 * workers)))
    starts = list(range(body_start, size, range_bytes))
    ends = starts[1:] + [size]
    stats["ranges"] = len(starts)
    pool = None
    known = body_start  # where the next entry starts, for certain (None: the list has ended)
    handover = False
    futures: dict = {}
    try:
        pool = executor or ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))

        def submit(k: int) -> None:
            if k < len(starts):
                futures[k] = pool.submit(read_range, opener, starts[k], ends[k], size, chunk_bytes, k == 0)

        for k in range(workers + 1):
            submit(k)
        for k in range(len(starts)):
            future = futures.pop(k)
            submit(k + workers + 1)
            if known is None or known >= ends[k]:
                future.cancel()  # no entry starts in this range
                stats["empty"] += 1
                continue
            try:
                read = future.result()
                if read.start != known:  # a wrong guess (or none): read the range from the real start
                    stats["read_again"] += 1
                    read = pool.submit(read_range, opener, known, ends[k], size, chunk_bytes, True).result()
            except Exception:  # a reader that failed: the sequential reader takes the rest
                read = RangeRead(known, ok=False)
            if not read.ok:
                handover = True
                break
            stats["accepted"] += 1
            placed = _placed(read, done[0], read_one)
            done[0] += read.n
            yield placed
            known = read.next
        handover = handover or known is not None  # (the ranges ended before the list did)
    except (OSError, RuntimeError, BrokenExecutor):  # no reader processes here: read on in this process
        handover = known is not None
    finally:
        for future in futures.values():
            future.cancel()
        if executor is None and pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    if handover:
        stats["handover_at"] = known
        with opener() as f:
            f.seek(known)
            yield from _entries(f, b"", read_one, chunk_bytes, done)
