"""The results JSON read in byte ranges by several readers gives exactly the sequential reader's
rows (and so the per-entry reader's), for every kind of entry and layout, wherever the ranges cut
(guesses that land inside strings or nested lists included), and fails exactly as it does."""

import io
import random
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from bpr_core import results_parallel
from bpr_core.formats import InputError
from bpr_core.results_arrow import iter_results_batches
from tests.data.test_results_arrow import _document, _entry, _reference, _same


def _ranged(data: bytes, range_bytes: int, chunk_bytes: int = 1 << 20, executor=None, workers: int = 3):
    """Rows read in ranges (threads unless an executor is given), sorted by position, and the
    reader's counts (results_parallel.iter_ranges' stats)."""
    opener = (lambda: pa.BufferReader(data))
    rows, stats = [], {}
    pool = executor or ThreadPoolExecutor(workers)
    try:
        for table, others in iter_results_batches(lambda: io.BytesIO(data), None, "r.json", chunk_bytes=chunk_bytes, ranged=opener,
                                                  workers=workers, min_bytes=0, range_bytes=range_bytes, executor=pool,
                                                  stats=stats):
            rows += table.to_pylist() + others
    finally:
        if executor is None:
            pool.shutdown()
    return sorted(rows, key=lambda r: r["position"]), stats


def _assert_same(got, want):
    assert len(got) == len(want)
    bad = [(g, w) for g, w in zip(got, want) if not _same(g, w)]
    assert not bad, bad[:2]
    assert [r["position"] for r in got] == list(range(len(want)))


@pytest.mark.parametrize("seed,odd", [(0, 0.0), (1, 0.02), (2, 0.1), (3, 0.3)])
def test_ranges_give_the_per_entry_readers_rows(seed, odd):
    rng = random.Random(seed)
    data = _document(rng, 300, odd).encode()
    want = _reference(data)
    for range_bytes in (37, 500, 4096, len(data)):
        for chunk in (64, 1 << 20):
            got, stats = _ranged(data, range_bytes, chunk)
            _assert_same(got, want)
            if odd == 0.0:  # the ranges were read by the readers, not handed to the sequential reader
                # (an entry that is not an object is: from there the sequential reader reads on)
                assert stats["handover_at"] is None and stats["accepted"] + stats["empty"] == stats["ranges"], stats
                assert stats["accepted"] >= min(stats["ranges"], 300) // 2, stats


def test_wrong_guesses_are_read_again_from_the_real_start():
    """Every entry holds a string with `}, {` and a nested list of objects: a range's guess lands
    inside them; the rows are still exact, and plain entries after them are read as columns."""
    tricky = '{"image_id": 1, "category_id": 2, "note": "x}, {y", "parts": [{"a": 1}, {"b": 2}], "score": 0.5, ' \
             '"segmentation": {"size": [4, 4], "counts": "04"}}'
    rng = random.Random(3)
    entries = [tricky if i % 3 == 0 else _entry(rng, 0.0) for i in range(200)]
    data = ("[" + ", ".join(entries) + "]").encode()
    want = _reference(data)
    read_again = 0
    for range_bytes in (29, 101, 333, 2048):
        got, stats = _ranged(data, range_bytes)
        _assert_same(got, want)
        assert stats["handover_at"] is None, stats
        read_again += stats["read_again"]
    assert read_again > 0
    start = data.index(b"x}, {y") - 5
    assert results_parallel.guess_start(pa.BufferReader(data), start, len(data)) == data.index(b"{y")  # a wrong guess


def test_an_entry_longer_than_many_ranges():
    rng = random.Random(4)
    long = '{"image_id": 1, "category_id": 1, "score": 0.5, "segmentation": [[' + ", ".join(str(i % 90) for i in range(5000)) + ']]}'
    entries = [_entry(rng, 0.0) for _ in range(20)] + [long] + [_entry(rng, 0.0) for _ in range(20)]
    data = ("[" + ",\n".join(entries) + "  ]  \n").encode()
    got, stats = _ranged(data, 1000, chunk_bytes=512)
    _assert_same(got, _reference(data))
    assert stats["handover_at"] is None and stats["empty"] >= 10, stats  # the ranges inside the long entry


@pytest.mark.parametrize("tail", [b"] x", b"]]", b"", b", ]", b", 3", b'{"a": 1}]', b"]" + b" " * 5000 + b"x"])
def test_malformed_ends_fail_as_the_per_entry_reader_does(tail):
    rng = random.Random(5)
    data = b"[" + b", ".join(_entry(rng, 0.0).encode() for _ in range(60)) + tail
    with pytest.raises(InputError) as want:
        _reference(data)
    for range_bytes in (100, 1000):
        with pytest.raises(InputError) as got:
            _ranged(data, range_bytes, chunk_bytes=256)
        assert str(got.value) == str(want.value)


def test_blanks_after_the_list_and_a_bom():
    rng = random.Random(6)
    body = _document(rng, 80, 0.05).encode()
    for data in (body + b" " * 3000, b"\xef\xbb\xbf" + body):
        got, _ = _ranged(data, 200)
        _assert_same(got, _reference(data))


def test_small_gzip_or_gt_files_are_read_sequentially():
    assert results_parallel.plan(lambda: pa.BufferReader(b"[" + b" " * 100 + b"]"), min_bytes=1000) is None
    assert results_parallel.plan(lambda: pa.BufferReader(b"\x1f\x8b" + b"x" * 100), min_bytes=0) is None
    assert results_parallel.plan(lambda: pa.BufferReader(b'{"images": []}'), min_bytes=0) is None
    assert results_parallel.plan(lambda: pa.BufferReader(b"\xef\xbb\xbf  [{}]"), min_bytes=0) == (9, 6)


def test_reader_processes_on_a_file(tmp_path):
    """The real thing: spawned reader processes, a file opened through a pyarrow filesystem."""
    rng = random.Random(8)
    data = _document(rng, 2000, 0.02).encode()
    path = tmp_path / "r.json"
    path.write_bytes(data)
    opener = results_parallel.FileOpener(pafs.LocalFileSystem(), str(path))
    rows = []
    for table, others in iter_results_batches(lambda: open(path, "rb"), None, "r.json", ranged=opener, workers=2,
                                              min_bytes=0, range_bytes=len(data) // 5):
        rows += table.to_pylist() + others
    _assert_same(sorted(rows, key=lambda r: r["position"]), _reference(data))


def test_reader_count_from_the_environment(monkeypatch):
    monkeypatch.setenv("BPR_JSON_READERS", "3")
    assert results_parallel.default_workers() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("BPR_JSON_READERS", bad)
        with pytest.raises(InputError, match="BPR_JSON_READERS"):
            results_parallel.default_workers()
    monkeypatch.delenv("BPR_JSON_READERS")
    assert 1 <= results_parallel.default_workers() <= results_parallel.MAX_WORKERS


def test_one_reader_reads_in_this_process(monkeypatch):
    """BPR_JSON_READERS=1: no reader processes, the sequential reader (no range is ever read)."""
    monkeypatch.setenv("BPR_JSON_READERS", "1")
    monkeypatch.setattr(results_parallel, "read_range", lambda *a: pytest.fail("a range was read"))
    data = _document(random.Random(9), 50, 0.0).encode()
    rows = []
    for table, others in iter_results_batches(lambda: io.BytesIO(data), None, "r.json", ranged=lambda: pa.BufferReader(data),
                                              min_bytes=0):
        rows += table.to_pylist() + others
    _assert_same(sorted(rows, key=lambda r: r["position"]), _reference(data))


def test_readers_that_cannot_start_or_fail_leave_the_reading_to_this_process():
    data = _document(random.Random(10), 200, 0.0).encode()
    want = _reference(data)

    class NoProcesses(ThreadPoolExecutor):  # e.g. a platform without process spawning
        def submit(self, *a, **k):
            raise RuntimeError("cannot start new processes")

    class FailsLater(ThreadPoolExecutor):  # the third range's reader dies
        calls = 0

        def submit(self, fn, *a, **k):
            FailsLater.calls += 1
            return super().submit(lambda: 1 / 0) if FailsLater.calls == 3 else super().submit(fn, *a, **k)

    for executor, accepted in ((NoProcesses(2), 0), (FailsLater(2), 2)):
        got, stats = _ranged(data, 2000, executor=executor, workers=2)
        executor.shutdown()
        _assert_same(got, want)
        assert stats["accepted"] == accepted and stats["handover_at"] is not None, stats


def test_a_file_shorter_than_planned_is_left_to_the_sequential_reader():
    """The file lost its end after the ranges were planned: a reader that meets the early end does
    not loop; the sequential reader reads what is there and fails as the per-entry reader does."""
    data = _document(random.Random(12), 100, 0.0).encode()
    cut = data[: len(data) // 2]
    read = results_parallel.read_range(lambda: pa.BufferReader(cut), 0, len(data) // 2 + 500, len(data), 1 << 20, True)
    assert not read.ok
    rows = []
    with pytest.raises(InputError) as got:
        for table, others in iter_results_batches(lambda: io.BytesIO(cut), None, "r.json", ranged=lambda: pa.BufferReader(cut),
                                                  workers=2, min_bytes=0, range_bytes=300, executor=ThreadPoolExecutor(2)):
            rows += table.to_pylist() + others
    with pytest.raises(InputError) as want:
        _reference(cut)
    assert str(got.value) == str(want.value)
