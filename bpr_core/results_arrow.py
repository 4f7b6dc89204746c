"""A COCO results JSON list read as columns: the same rows as `formats.iter_results_json`, faster.

The per-entry reader builds every entry as Python objects and checks it field by field: 4-5 us
per entry on this box, ~13 us when the entry carries the detector's `bbox` (as detectron2's and
mmdetection's files do), and that ran on the refinement job's driver once per input instance. Here
the common entry is read by whole-chunk operations in C++ (Arrow's compute functions, RE2):

1. A chunk of the list is split at every `}, {` (any blanks around the comma) into pieces.
2. Each piece is matched, anchored, against the grammar of a plain entry in the key order the
   chunk's first piece uses (detectron2, mmdetection and pycocotools each write one order): its
   four keys once each (image_id, category_id, score, segmentation {size, counts}), an optional
   bbox of four numbers, no other key; ids of at most 18 digits, sizes from 1, the counts string in
   the RLE alphabet (the bytes 48-111, a backslash escaped). None of these can hold `}`, `,`, `{` or
   a quote, so when every piece of a chunk matches, the split was at the entries' own boundaries.
   A chunk where some piece matches no order the chunk uses (a polygon, an instance_id, another
   key, a nested object) is cut apart by the exact scan below and read entry by entry.
3. The captured texts become columns by Arrow's casts (ids and sizes to int64, the score to a
   double exactly as Python's float() reads it), and `detector_fields` is `{"bbox":[...]}` formatted
   as Python's json writes what the per-entry reader parses: an integer as its text, a float as its
   repr (Arrow's shortest digits, fixed notation for 1e-4 <= |v| < 1e16 and Python's '.0'). An
   entry whose values need more (a non-finite score, a box value outside that range) is read by
   the per-entry reader.
4. Anything that is not a well-formed list (text after it, a truncated file, invalid UTF-8, a
   malformed entry, an element over the size bound, a GT-style object) hands the file to the
   per-entry reader from its start, which skips the entries already given and fails exactly as it
   always has, with the same message.

The per-entry reader stays the definition; this path is tested to give the same rows, field for
field, over generated files of every kind of entry, key order, layout and chunk size
(tests/data/test_results_arrow.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .formats import (MAX_ENTRY_CHARS, REQUIRED_RESULT_KEYS, ImageRecord, RecordError, _may_be_cut, invalid_row,
                      iter_results_json, open_binary, result_to_row)

CHUNK_BYTES = 4 << 20  # bytes read per step (a step yields the entries that end in it)
FALLBACK_BATCH = 65_536  # entries per batch when the per-entry reader has the file
MAX_ORDERS = 8  # key orders tried per chunk (a file usually has one) before it is read entry by entry
MAX_ODD = 64  # entries per chunk cut out one by one; a chunk with more is cut by one exact scan

ROW_SCHEMA = pa.schema([("image_id", pa.int64()), ("instance_id", pa.int64()), ("category_id", pa.int64()),
                        ("score", pa.float64()), ("rle_counts", pa.string()), ("rle_h", pa.int64()),
                        ("rle_w", pa.int64()), ("detector_fields", pa.string()), ("position", pa.int64())])

# The grammar of a plain entry's inside (the text between its braces), for RE2.
_W = r"[ \t\n\r]*"  # JSON's blanks (RE2's \s would admit \f and \v)
# (Digit counts are checked on the values' texts, not with counted repetition, which would
# multiply RE2's program.)
_INT = r"-?(?:0|[1-9][0-9]*)"
_POS = r"[1-9][0-9]*"
_NUM = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?"
_COUNTS = r"(?:[0-9:;<=>?@A-Z\[\]^_`a-o]|\\\\)*"  # compressed RLE: bytes 48-111, the backslash escaped
_SEPARATOR = r"\}" + _W + "," + _W + r"\{"
_VALUES = {  # matched, never captured: RE2's DFA alone (the values' spans come from the quotes)
    "image_id": _INT,
    "category_id": _INT,
    "score": _NUM,
    "bbox": r"\[" + _W + (_W + "," + _W).join([_NUM] * 4) + _W + r"\]",
    "size": r"\[" + _W + _POS + _W + "," + _W + _POS + _W + r"\]",
    "counts": f'"{_COUNTS}"',
}
_KEY = re.compile(r'"(image_id|category_id|score|bbox|segmentation|size|counts)"[ \t\n\r]*:')
_BLANK = " \t\n\r"  # JSON's blanks
_WS = _BLANK.encode()


def _member(key: str, inner: tuple[str, ...]) -> str:
    if key == "segmentation":
        value = r"\{" + _W + (_W + "," + _W).join(_member(k, ()) for k in inner) + _W + r"\}"
    else:
        value = _VALUES[key]
    return f'"{key}"' + _W + ":" + _W + value


def _order(piece: str) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """The key order of an entry's inside (top level, and inside its segmentation) if it has the
    keys of a plain entry; None if not."""
    keys = _KEY.findall(piece)
    top = tuple(k for k in keys if k not in ("size", "counts"))
    inner = tuple(k for k in keys if k in ("size", "counts"))
    if sorted(top) not in (sorted(REQUIRED_RESULT_KEYS), sorted(REQUIRED_RESULT_KEYS + ("bbox",))) \
            or sorted(inner) != ["counts", "size"]:
        return None
    return top, inner


def _pattern(order: tuple[tuple[str, ...], tuple[str, ...]]) -> str:
    top, inner = order
    return "^" + _W + (_W + "," + _W).join(_member(k, inner) for k in top) + _W + "$"


class _Exact(Exception):
    """Hand the file to the per-entry reader (it is not a well-formed list of objects)."""


# Byte kinds for the exact scan (0: not structural).
_OBJ, _END_OBJ, _ARR, _END_ARR, _COMMA, _QUOTE = range(1, 7)
_KIND = np.zeros(256, np.uint8)
for _c, _k in ((b"{", _OBJ), (b"}", _END_OBJ), (b"[", _ARR), (b"]", _END_ARR), (b",", _COMMA), (b'"', _QUOTE)):
    _KIND[_c[0]] = _k


@dataclass
class _Scan:
    ends: np.ndarray  # each complete entry's terminator: a comma at depth 1, or the list's closing bracket
    closed: bool  # the last terminator is the closing bracket


def _scan(buf: bytes) -> _Scan:
    """Where the entries of a buffer end, exactly, for any JSON: the buffer starts inside the list
    at an entry's start (depth 1, outside strings). Escape pairs are masked left to right (as JSON
    reads them), quotes paired, and the brackets outside strings counted."""
    masked = buf.replace(b"\\\\", b"__").replace(b'\\"', b"__")
    kind_all = _KIND[np.frombuffer(masked, np.uint8)]
    pos = np.flatnonzero(kind_all)
    kind = kind_all[pos]
    quote = kind == _QUOTE
    inside = (np.cumsum(quote) & 1).astype(bool)  # after an odd number of quotes: in a string
    outside = ~quote & ~inside
    pos, kind = pos[outside], kind[outside]
    delta = np.zeros(len(kind), np.int64)
    delta[(kind == _OBJ) | (kind == _ARR)] = 1
    delta[(kind == _END_OBJ) | (kind == _END_ARR)] = -1
    after = 1 + np.cumsum(delta)
    before = after - delta
    close = np.flatnonzero((kind == _END_ARR) & (before == 1))
    stop = int(close[0]) + 1 if len(close) else len(kind)  # events up to the list's end
    if np.any(after[:stop - 1 if len(close) else stop] < 1):
        raise _Exact()  # a bracket closes more than was opened (only the list's own may reach depth 0)
    term = (before[:stop] == 1) & ((kind[:stop] == _COMMA) | (kind[:stop] == _END_ARR))
    return _Scan(pos[:stop][term], bool(len(close)))


def exact_reader(sizes, name: str) -> Callable[[str | bytes, int], dict]:
    """read_one(text, position): one entry, cut out exactly, as the per-entry reader gives it."""
    return lambda text, position: _exact_row(text, position, sizes, name)


def _exact_row(text: str | bytes, position: int, sizes, name: str) -> dict:
    """One entry's row as the per-entry reader gives it (the entry is cut out exactly)."""
    try:
        det = json.loads(text if isinstance(text, str) else text.decode("utf-8"))
    except ValueError:
        raise _Exact() from None  # malformed: the per-entry reader names it
    try:
        row = result_to_row(det, position, sizes, name)
    except RecordError as e:
        row = invalid_row(position, f"{name} entry {position}: {e}", det)
    row["position"] = position
    return row


def _has(texts: pa.Array, sub: str) -> np.ndarray:
    return pc.match_substring(texts, sub).to_numpy(zero_copy_only=False)


def _python_float_text(values: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """repr(float) of each value, as Python's json writes it, where Arrow's shortest text gives it
    (zero, and 1e-4 <= |v| < 1e16: fixed notation with the same shortest digits; an integral value
    gets Python's '.0'); and which values it could be built for."""
    v = values.to_numpy(zero_copy_only=False)
    text = pc.cast(values, pa.string())
    mag = np.abs(v)
    with np.errstate(invalid="ignore"):
        ok = (mag == 0) | ((mag >= 1e-4) & (mag < 1e16))
    ok &= ~(_has(text, "e") | _has(text, "n"))  # no exponent, inf or nan (defensive: not in that range)
    return pc.if_else(pa.array(~_has(text, ".")), pc.binary_join_element_wise(text, ".0", ""), text), ok


def _spans(data: pa.Buffer, a: np.ndarray, b: np.ndarray) -> pa.Array:
    """The strings data[a[i]:b[i]] (disjoint, in order) without a Python loop: one string array
    over the buffer whose offsets alternate between the spans and the gaps, every other one taken."""
    offsets = np.empty(2 * len(a), np.int64)
    offsets[0::2], offsets[1::2] = a, b
    whole = pa.LargeStringArray.from_buffers(len(offsets) - 1, pa.py_buffer(offsets), data)
    return whole.take(pa.array(np.arange(0, len(offsets) - 1, 2))).cast(pa.string())


def _numbers(texts: pa.Array, count: int) -> list[pa.Array]:
    """`: [a, b, ...],` texts of `count` numbers each (the grammar vouched for them) -> a column each."""
    flat = pc.utf8_trim(pc.split_pattern(pc.utf8_trim(texts, _BLANK + ":,[]}"), ",").flatten(), _BLANK)
    return [flat.take(pa.array(np.arange(j, len(flat), count))) for j in range(count)]


def _box_text(tokens: list[pa.Array]) -> tuple[pa.Array, np.ndarray]:
    """`{"bbox":[...]}` as the per-entry reader writes it (json.dumps of what json.loads read: an
    integer keeps its text, -0 is 0; a float is its repr), and where it could be built here."""
    texts, ok = [], np.ones(len(tokens[0]), bool)
    for token in tokens:
        as_int = ~(_has(token, ".") | _has(token, "e") | _has(token, "E"))
        ok &= ~as_int | (pc.utf8_length(token).to_numpy(zero_copy_only=False) <= 301)  # float() takes it
        floats, float_ok = _python_float_text(pc.cast(token, pa.float64()))
        texts.append(pc.if_else(pa.array(as_int), pc.if_else(pc.equal(token, "-0"), "0", token), floats))
        ok &= as_int | float_ok
    return pc.binary_join_element_wise('{"bbox":[', texts[0], ",", texts[1], ",", texts[2], ",", texts[3], "]}", ""), ok


def _layout(order) -> tuple[dict[str, int], int]:
    """The index of each key's closing quote among an entry's quotes, keys in text order (the
    counts value's opening quote as "value"), and the number of quotes per entry."""
    keys = [k for key in order[0] for k in ((key,) + order[1] if key == "segmentation" else (key,))]
    close, q = {}, 0
    for k in keys:
        close[k] = q + 1
        q += 2
        if k == "counts":
            close["value"] = q
            q += 2
    return close, q


def _match_orders(pieces: pa.Array) -> tuple[np.ndarray, list]:
    """Which plain-entry order each piece matches (its index in the returned orders; -1: none), the
    orders learnt from the pieces themselves, up to MAX_ORDERS. The grammar is matched by RE2's DFA
    (no captures: fast)."""
    which = np.full(len(pieces), -1, np.int64)
    orders, tried = [], 0
    todo = np.arange(len(pieces))
    while len(todo) and tried < MAX_ORDERS:
        try:
            order = _order(pieces[int(todo[0])].as_py())
        except UnicodeDecodeError:
            order = None
        tried += 1
        if order is None or order in orders:
            todo = todo[1:]  # not a plain entry (or one its own order does not match): left unmatched
            continue
        sub = pieces if len(todo) == len(pieces) else pieces.take(pa.array(todo))
        hit = pc.match_substring_regex(sub, _pattern(order)).to_numpy(zero_copy_only=False)
        which[todo[hit]] = len(orders)
        orders.append(order)
        hit[0] = True  # (a piece its own order does not match is not plain: left unmatched)
        todo = todo[~hit]
    return which, orders


def _columns(sub: pa.Array, order, positions: np.ndarray, read_one: Callable) -> tuple[pa.Table, list[dict]]:
    """Pieces that all match `order` -> (the rows the columns vouch for, the others' rows from the
    per-entry reader: a value the columns cannot give as Python would).

    With the key order fixed, every piece has its quotes at the same places in the sequence (the
    keys and the counts string; no other string, no escaped quote), so one search for quotes over
    the pieces' bytes gives every value's span: from its key's closing quote to the next quote (or
    the piece's end)."""
    close, per = _layout(order)
    _, offs_buf, data = sub.buffers()
    offsets = np.frombuffer(offs_buf, np.int32)[sub.offset: sub.offset + len(sub) + 1].astype(np.int64)  # into `data`
    quotes = offsets[0] + np.flatnonzero(np.frombuffer(data, np.uint8)[offsets[0]:offsets[-1]] == ord('"'))
    if len(quotes) != per * len(sub):
        raise _Exact()  # cannot happen for pieces the grammar matched
    quotes = quotes.reshape(-1, per)

    def value(k: str) -> pa.Array:
        at = close[k] + 1
        return _spans(data, quotes[:, close[k]] + 1, quotes[:, at] if at < per else offsets[1:])

    ids = {k: pc.utf8_trim(value(k), _BLANK + ":,") for k in ("image_id", "category_id")}
    h, w = _numbers(value("size"), 2)
    score_text = pc.utf8_trim(value("score"), _BLANK + ":,}")
    score = pc.cast(score_text, pa.float64())
    ok = np.isfinite(score.to_numpy(zero_copy_only=False))
    for col in (*ids.values(), h, w):  # at most 18 digits: certainly an int64 (longer: entry by entry)
        ok &= pc.utf8_length(pc.utf8_ltrim(col, "-")).to_numpy(zero_copy_only=False) <= 18
    ok &= pc.utf8_length(score_text).to_numpy(zero_copy_only=False) <= 301  # float() of an integer takes it
    fields = pa.nulls(len(sub), pa.string())
    if "bbox" in order[0]:
        fields, box_ok = _box_text(_numbers(value("bbox"), 4))
        ok &= box_ok
    keep = pa.array(ok)
    counts = _spans(data, quotes[:, close["value"]] + 1, quotes[:, close["value"] + 1]).filter(keep)
    table = pa.table({
        "image_id": pc.cast(ids["image_id"].filter(keep), pa.int64()), "instance_id": pa.array(positions[ok]),
        "category_id": pc.cast(ids["category_id"].filter(keep), pa.int64()), "score": score.filter(keep),
        "rle_counts": pc.replace_substring(counts, "\\\\", "\\"),
        "rle_h": pc.cast(h.filter(keep), pa.int64()), "rle_w": pc.cast(w.filter(keep), pa.int64()),
        "detector_fields": fields.filter(keep), "position": pa.array(positions[ok])}, schema=ROW_SCHEMA)
    others = [read_one("{" + sub[int(i)].as_py() + "}", int(positions[i])) for i in np.flatnonzero(~ok)]
    return table, others


def _as_string(data: bytes) -> pa.Array:
    """One Arrow string over the bytes (not validated: only ASCII pieces are ever vouched for)."""
    return pa.StringArray.from_buffers(1, pa.py_buffer(np.array([0, len(data)], np.int32)), pa.py_buffer(data))


_SEPARATOR_RE = re.compile(_SEPARATOR.encode())


def _first_end(buf: bytes, start: int) -> int | None:
    """Where the entry that starts at `start` ends, exactly (its terminator: the comma or the list's
    closing bracket), scanning a window that grows; None if it does not end in `buf`."""
    window = 1 << 12
    while True:
        scan = _scan(buf[start:start + window])
        if len(scan.ends):
            return start + int(scan.ends[0])
        if start + window >= len(buf):
            return None
        window *= 4


def _walk(buf: bytes, body: bytes, lead: int, last_len: int, which: np.ndarray, eof: bool, carry: bytes,
          first: int, read_one: Callable, others: list[dict]):
    """The entries of a buffer whose pieces are not all plain: plain pieces are entries as long as
    the pieces before them were (the cut is then at real boundaries); from a piece that is not, the
    entries are cut out exactly (a scan from the entry's start) and read by the per-entry reader,
    until an entry starts where a piece does again. Returns (each piece's entry number, -1 for
    pieces inside entries read whole; the number of entries; the carry), or (None, ...) where the
    exact scan has to cut the whole buffer."""
    n = len(which)
    seps = [(m.start(), m.end()) for m in _SEPARATOR_RE.finditer(body, 0, len(body) - last_len)]
    starts = np.array([lead] + [lead + b for _, b in seps], np.int64)  # each piece's entry start (its '{') in buf
    carry_at = starts[n] if len(starts) > n else len(buf)  # where the carried piece's entry starts
    entry = np.full(n, -1, np.int64)
    e, i, at, odd = 0, 0, lead, 0
    while True:
        if i is not None:
            if i >= n:
                break
            if which[i] >= 0:
                entry[i], e, i = e, e + 1, i + 1
                continue
            at = int(starts[i])
        if at >= carry_at:
            carry = buf[at:]  # the entry starts in the carried piece
            break
        end = _first_end(buf, at)  # a real entry starts at `at`: cut it exactly
        if end is None:
            if eof:
                return None, 0, b""
            carry = buf[at:]  # it goes on past this buffer
            break
        odd += 1
        if odd > MAX_ODD:
            return None, 0, b""
        others.append(read_one(buf[at:end], first + e))
        e += 1
        if buf[end] == ord("]"):  # the list's end: only where the buffer's tail said it is
            if not eof or buf[end + 1:].strip(_WS):
                return None, 0, b""
            break
        nxt = len(buf) - len(buf[end + 1:].lstrip(_WS))
        j = int(np.searchsorted(starts[:n], nxt))
        i, at = (j, nxt) if j < n and starts[j] == nxt else (None, nxt)
    return entry, e, carry


def _fast_chunk(buf: bytes, eof: bool, first: int, read_one: Callable):
    """A buffer that starts at an entry's start -> (table, other rows, number of entries, carry),
    or None where the exact scan has to cut all of it (the list's end not where an entry ends).

    The buffer is cut at every `}, {`. When every piece is a plain entry, the cut was at the
    entries' own boundaries (the pieces parse, one after the other, as the list). A piece that is
    not (it may also be a wrong cut: `}, {` inside a string or a nested list) starts a real entry
    if the pieces before it were plain; that entry is cut out exactly by a scan from its start, read
    by the per-entry reader, and the pieces go on after its end."""
    lead = len(buf) - len(buf.lstrip(_WS))
    if lead == len(buf) or buf[lead] != ord("{") or len(buf) >= 1 << 31:
        return None
    body = buf[lead + 1:]
    try:
        pieces = pc.split_pattern_regex(_as_string(body), _SEPARATOR).flatten()
        k = len(pieces) - 1  # complete pieces: each followed by a separator
        last_len = pc.binary_length(pieces.slice(k)).to_pylist()[0]
        last = body[len(body) - last_len:]
        if not eof:
            complete, carry = pieces.slice(0, k), b"{" + last
        else:  # the last piece ends the entry and the list: `...} ]`
            tail = last.rstrip(_WS)
            if not tail.endswith(b"]"):
                return None
            tail = tail[:-1].rstrip(_WS)
            if not tail.endswith(b"}"):
                return None
            complete = pa.concat_arrays([pieces.slice(0, k), pa.array([tail[:-1].decode("utf-8")])])
            carry = b""
        if not len(complete) and len(buf) > MAX_ENTRY_CHARS:
            return None  # the exact branch reports the bound
        which, orders = _match_orders(complete) if len(complete) else (None, [])
    except (pa.ArrowException, UnicodeDecodeError):
        return None
    if not len(complete):
        _check_begun(buf)  # no entry ends in the buffer yet: read on, unless the one begun is malformed
        return ROW_SCHEMA.empty_table(), [], 0, carry
    n = len(complete)
    entry = np.arange(n)  # each piece's entry number (-1: inside an entry read whole)
    others: list[dict] = []
    if (which < 0).sum() > MAX_ODD:
        return None  # mostly entries that are not plain (polygons, ...): one exact scan for the chunk
    if (which < 0).any():
        entry, n, carry = _walk(buf, body, lead, last_len, which, eof, carry, first, read_one, others)
        if entry is None:
            return None
    tables = []
    try:
        for o, order in enumerate(orders):
            at = np.flatnonzero((which == o) & (entry >= 0))
            if len(at):
                table, bad = _columns(complete.take(pa.array(at)), order, first + entry[at], read_one)
                tables.append(table)
                others += bad
    except pa.ArrowException:
        return None  # (not expected for pieces the grammar matched) the exact scan reads the chunk
    return (pa.concat_tables(tables) if tables else ROW_SCHEMA.empty_table()), others, n, carry


def _check_begun(buf: bytes) -> None:
    """A buffer in which no entry has been cut yet: if what it holds is already malformed (e.g. NUL
    padding after an entry), hand over now (the per-entry reader names the byte) rather than read
    on to the size bound. Entries that are complete are stepped over; the first incomplete one may
    just be cut by the buffer's end."""
    text = buf.decode("utf-8", errors="replace")  # a character cut at the end stays at the end
    decoder, pos = json.JSONDecoder(), 0
    while True:
        pos = len(text) - len(text[pos:].lstrip(_BLANK))
        if pos >= len(text):
            return
        try:
            _, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            if not _may_be_cut(e, text):
                raise _Exact() from None
            return
        rest = text[pos:].lstrip(_BLANK)
        if rest and rest[0] == ",":
            pos = len(text) - len(rest) + 1
        elif rest and rest[0] != "]":
            raise _Exact()  # a value followed by something that does not end it


def _skip_ws(f, head: bytes) -> bytes:
    """`head` and what follows in `f` from the first non-blank byte on (b"" at the end)."""
    while True:
        rest = head.lstrip(_WS)
        if rest:
            return rest
        head = f.read(CHUNK_BYTES)
        if not head:
            return b""


def _columnar(open_stream: Callable, read_one: Callable, name: str, chunk_bytes: int,
              done: list[int]) -> Iterator[tuple[pa.Table, list[dict]]]:
    what = f"results file {name}"
    raw = open_stream()
    with raw, open_binary(raw, what) as f:
        head = _skip_ws(f, f.read(chunk_bytes))
        if not head.startswith(b"["):
            raise _Exact()  # a GT-style object, or not JSON: the per-entry reader decides
        yield from _entries(f, head[1:], read_one, chunk_bytes, done)


def _entries(f, carry: bytes, read_one: Callable, chunk_bytes: int, done: list[int]) -> Iterator[tuple[pa.Table, list[dict]]]:
    """The list's entries from an entry's start on, to the list's end: `carry` holds the first bytes
    (blanks may lead), `f` the rest; done[0] entries come before (positions count on from there)."""
    eof = False
    while True:
        # at least as much again as is carried: an entry longer than a chunk is scanned a
        # number of times logarithmic, not linear, in its length
        data = f.read(max(chunk_bytes, len(carry))) if not eof else b""
        eof = eof or not data
        buf = carry + data
        fast = _fast_chunk(buf, eof, done[0], read_one)
        if fast is not None:
            table, others, n, carry = fast
            if n:
                done[0] += n
                yield table, others
            if eof:
                return
            continue
        # Cut exactly, then read entry by entry.
        scan = _scan(buf)
        if not len(scan.ends):
            if eof or len(buf) > MAX_ENTRY_CHARS:
                raise _Exact()  # not closed, or an element over the bound
            _check_begun(buf)
            carry = buf
            continue
        end = int(scan.ends[-1]) + 1
        if scan.closed and _skip_ws(f, buf[end:]):
            raise _Exact()  # text after the list
        starts = np.r_[0, scan.ends[:-1] + 1]
        rows = [read_one(buf[a:b], done[0] + i) for i, (a, b) in enumerate(zip(starts.tolist(), scan.ends.tolist()))]
        done[0] += len(rows)
        yield ROW_SCHEMA.empty_table(), rows
        if scan.closed:
            return
        if eof:
            raise _Exact()  # the list is not closed
        carry = buf[end:]


def iter_results_batches(open_stream: Callable, sizes: dict[int, ImageRecord] | None, name: str,
                         chunk_bytes: int = CHUNK_BYTES, ranged: Callable | None = None,
                         workers: int | None = None, **parallel) -> Iterator[tuple[pa.Table, list[dict]]]:
    """A results JSON (plain or gzip; `open_stream()` opens it as a binary stream, again if the
    per-entry reader has to take over) in steps: (a table of ROW_SCHEMA of the rows the columns
    vouch for, the other entries' rows as the per-entry reader gives them: valid rows as dicts,
    bad ones with an `invalid` reason, each with its `position`). Together, the rows of
    `iter_results_json(..., strict=False)`, each with its position. A malformed file raises the
    per-entry reader's InputError.

    `ranged`: a picklable callable that opens the same file for random access; a plain file of
    results_parallel.MIN_BYTES or more is then read by `workers` processes at once (default one per
    core, at most 8; `parallel` passes its other settings: min_bytes, range_bytes, executor, stats)."""
    done = [0]
    read_one = exact_reader(sizes, name)
    try:
        layout = None
        if ranged is not None:
            from . import results_parallel

            workers = workers or results_parallel.default_workers()
            if workers > 1:
                layout = results_parallel.plan(ranged, parallel.pop("min_bytes", None))
        if layout:
            yield from results_parallel.iter_ranges(ranged, *layout, read_one, chunk_bytes, done, workers, **parallel)
        else:
            yield from _columnar(open_stream, read_one, name, chunk_bytes, done)
        return
    except (_Exact, EOFError, OSError):
        pass
    rows: list[dict] = []
    with open_stream() as raw:
        for position, row in enumerate(iter_results_json(raw, sizes, name=name, strict=False)):
            if position < done[0]:
                continue  # given already, identical
            row["position"] = position
            rows.append(row)
            if len(rows) >= FALLBACK_BATCH:
                yield ROW_SCHEMA.empty_table(), rows
                rows = []
    yield ROW_SCHEMA.empty_table(), rows
