"""Key hashing and hash ranges: which subtask owns a key, the same in every process and every run.

A key is the tuple of values of an operator's key columns. Its hash is a 64-bit unsigned integer,
a pure function of the values (never of the process, the Python hash seed or the batch): equal
keys hash equally in every runner, so a shuffle sends each key to one subtask and a restore with
another parallelism finds every key's state.

Ownership: a subtask ``i`` of an operator with parallelism ``P`` owns the contiguous range of
hashes ``h`` with ``((h >> 32) * P) >> 32 == i``, that is ``[i * 2**32 / P, (i+1) * 2**32 / P)``
of the hash's top 32 bits. Ranges of P subtasks tile the whole space, so a key always has exactly
one owner, and a rescale moves whole sub-ranges between subtasks.

Hashing is vectorised with numpy: integers, booleans and timestamps are mixed directly; strings
and binaries are absorbed a 64-bit word at a time straight from the Arrow buffers (no Python
object per row). Nulls hash to a fixed value. Several key columns are combined in order.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from sluice.errors import UserError

#: name of the column that keyed operators store with their state
KEY_HASH_COLUMN = "_key_hash"

_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_NULL_HASH = np.uint64(0x6A09E667F3BCC908)
_S30, _S27, _S31, _S32 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(32)


class KeyTypeError(UserError, TypeError):
    """A key column's type cannot be hashed: bad input that no retry can fix."""


def _splitmix(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = (z ^ (z >> _S30)) * _MIX1
        z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


#: rows hashed at a time: bounds the temporary arrays
HASH_SLICE_ROWS = 65536
#: MASKS[k] keeps the low k bytes of a little-endian 64-bit word (k = 0..8)
_MASKS = np.array([0] + [(1 << (8 * k)) - 1 for k in range(1, 8)] + [(1 << 64) - 1], dtype=np.uint64)


def _hash_binary(arr: pa.Array) -> np.ndarray:
    """Hash of each value's bytes, a slice of rows at a time."""
    if len(arr) <= HASH_SLICE_ROWS:
        return _hash_binary_slice(arr)
    return np.concatenate([
        _hash_binary_slice(arr.slice(i, HASH_SLICE_ROWS)) for i in range(0, len(arr), HASH_SLICE_ROWS)
    ])


def _hash_binary_slice(arr: pa.Array) -> np.ndarray:
    """Each value's bytes, zero-padded to whole little-endian 64-bit words w0, w1, ... (at least
    one), absorbed in order: ``h = mix(len * G + G)``, then ``h = mix(h ^ w)`` per word.

    Vectorised over rows: the words are read straight from the Arrow data buffer through an
    overlapping 64-bit view (one per byte position) and masked to the value's length; rows with
    more words take further passes, over fewer rows each."""
    large = pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type)
    offsets_type = np.int64 if large else np.int32
    arr = arr.cast(pa.large_binary() if large else pa.binary())
    n = len(arr)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=offsets_type, count=n + 1,
                            offset=arr.offset * np.dtype(offsets_type).itemsize).astype(np.int64)
    start, end = int(offsets[0]), int(offsets[-1])
    padded = np.zeros(end - start + 8, dtype=np.uint8)  # 8 spare bytes: the last word never overruns
    if bufs[2] is not None and end > start:
        padded[: end - start] = np.frombuffer(bufs[2], dtype=np.uint8)[start:end]
    words = np.ndarray((end - start + 1,), dtype="<u8", buffer=padded, strides=(1,))
    pos = offsets[:-1] - start
    left = np.diff(offsets)
    with np.errstate(over="ignore"):
        h = _splitmix(left.astype(np.uint64) * _GOLDEN + _GOLDEN)
        h = _splitmix(h ^ (words[pos] & _MASKS[np.minimum(left, 8)]))
        rows: np.ndarray | None = None  # None: every row is still going
        pos, left = pos + 8, left - 8
        while True:
            more = left > 0
            if not more.any():
                return h
            if rows is None and more.all():
                h = _splitmix(h ^ (words[pos] & _MASKS[np.minimum(left, 8)]))
            else:
                if rows is None:
                    rows = np.arange(n)
                rows, pos, left = rows[more], pos[more], left[more]
                h[rows] = _splitmix(h[rows] ^ (words[pos] & _MASKS[np.minimum(left, 8)]))
            pos, left = pos + 8, left - 8


def _hash_column(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    if isinstance(col, pa.ChunkedArray):
        # Chunk by chunk: no copy of the column, and string slices stay bounded (big state tables).
        if col.num_chunks == 0:
            return np.empty(0, np.uint64)
        if col.num_chunks > 1:
            return np.concatenate([_hash_column(c) for c in col.chunks])
        col = col.chunk(0)
    t = col.type
    if pa.types.is_dictionary(t):
        if len(col.dictionary) == 0:  # every value is null
            h = np.full(len(col), _NULL_HASH, dtype=np.uint64)
        else:
            h = _hash_column(col.dictionary)[np.asarray(col.indices.fill_null(0))]
    elif pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        h = _hash_binary(col)
    elif pa.types.is_integer(t) or pa.types.is_temporal(t) or pa.types.is_boolean(t):
        if pa.types.is_date32(t) or pa.types.is_time32(t):
            col = col.cast(pa.int32()).cast(pa.int64())
        elif pa.types.is_temporal(t):
            col = col.cast(pa.int64())
        elif pa.types.is_boolean(t):
            col = col.cast(pa.int8())
        values = np.asarray(col.fill_null(0)).astype(np.int64).view(np.uint64)
        h = _splitmix(values ^ _GOLDEN)
    elif pa.types.is_floating(t):
        floats = np.asarray(col.cast(pa.float64()).fill_null(0.0)) + 0.0  # -0.0 and 0.0 are one key
        h = _splitmix(floats.view(np.uint64))
    else:
        raise KeyTypeError(f"cannot use a column of type {t} as a key (strings, binaries, integers, "
                           f"floats, booleans, dates and timestamps can be)")
    if col.null_count:
        h = np.where(np.asarray(col.is_null()), _NULL_HASH, h)
    return h


def key_hashes(batch: pa.RecordBatch | pa.Table, key: list[str]) -> np.ndarray:
    """The 64-bit hash of every row's key (the values of `key` columns, in order).

    Raises KeyError naming a missing column, TypeError for a column type that cannot be a key.
    """
    h: np.ndarray | None = None
    for name in key:
        idx = batch.schema.get_field_index(name)
        if idx < 0:
            raise KeyError(f"key column {name!r} is not in the input (columns: {', '.join(batch.schema.names)})")
        ch = _hash_column(batch.column(idx))
        with np.errstate(over="ignore"):
            h = ch if h is None else _splitmix(h * _MIX1 + ch)
    if h is None:
        raise ValueError("a key needs at least one column")
    return h


def owners(hashes: np.ndarray, parallelism: int) -> np.ndarray:
    """The subtask (0..parallelism-1) owning each hash."""
    return (((hashes >> _S32) * np.uint64(parallelism)) >> _S32).astype(np.int64)


def owned_mask(hashes: np.ndarray, parallelism: int, index: int) -> np.ndarray:
    """True for the hashes owned by subtask `index` of `parallelism`."""
    return owners(hashes, parallelism) == index


def hash_range(parallelism: int, index: int) -> tuple[int, int]:
    """[lo, hi) of the 64-bit hashes owned by subtask `index` of `parallelism` (for display and docs)."""
    lo = -(-(index << 32) // parallelism)
    hi = -(-((index + 1) << 32) // parallelism)
    return lo << 32, min(hi << 32, 1 << 64)


def partition(batch: pa.RecordBatch, hashes: np.ndarray, parallelism: int) -> list[pa.RecordBatch | None]:
    """Split `batch` by owner: element i holds the rows owned by subtask i (None when it has none).
    Rows keep their relative order within each part."""
    if parallelism == 1:
        return [batch if batch.num_rows else None]
    who = owners(hashes, parallelism).astype(np.int16)  # 16-bit keys make numpy's stable sort a radix sort
    counts = np.bincount(who, minlength=parallelism)
    if counts.max() == batch.num_rows:  # one owner for every row: no copy
        return [batch if c else None for c in counts.tolist()]
    order = np.argsort(who, kind="stable")
    taken = batch.take(pa.array(order))
    out: list[pa.RecordBatch | None] = []
    pos = 0
    for c in counts.tolist():
        out.append(taken.slice(pos, c) if c else None)
        pos += c
    return out


def filter_owned(table: pa.Table, parallelism: int, index: int) -> pa.Table:
    """The rows of a keyed state table (with a KEY_HASH_COLUMN) owned by subtask `index`."""
    if table.num_rows == 0:
        return table
    hashes = np.asarray(table.column(KEY_HASH_COLUMN).combine_chunks()).view(np.uint64)
    return table.filter(pa.array(owned_mask(hashes, parallelism, index)))


__all__ = ["KEY_HASH_COLUMN", "filter_owned", "hash_range", "key_hashes", "owned_mask", "owners", "partition"]
