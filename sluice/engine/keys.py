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
and binaries get a polynomial hash of their bytes computed over the Arrow buffers (no Python
object per row). Nulls hash to a fixed value. Several key columns are combined in order.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

#: name of the column that keyed operators store with their state
KEY_HASH_COLUMN = "_key_hash"

_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_BYTE_BASE = np.uint64(0x100000001B3)  # FNV prime, as the polynomial base for bytes
_NULL_HASH = np.uint64(0x6A09E667F3BCC908)
_S30, _S27, _S31, _S32 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(32)


def _splitmix(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = (z ^ (z >> _S30)) * _MIX1
        z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


class _Powers:
    """``base ** k`` and ``base ** -k`` modulo 2**64 for k < n, grown on demand (base is odd, so it
    has an inverse): hashing a string by prefix sums needs both. Snapshots hash keys in worker
    threads while the event loop hashes batches, so both tables are swapped in as one tuple."""

    def __init__(self) -> None:
        self._tables = (np.ones(1, dtype=np.uint64), np.ones(1, dtype=np.uint64))

    def get(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        up, down = self._tables
        if len(up) < n:
            size = max(n, 2 * len(up), 1 << 16)
            inverse = np.uint64(pow(int(_BYTE_BASE), -1, 1 << 64))
            up, down = _powers(_BYTE_BASE, size), _powers(inverse, size)
            self._tables = (up, down)
        return up[:n], down[:n]


def _powers(base: np.uint64, n: int) -> np.ndarray:
    """base**k for k < n (mod 2**64): a short cumulative product per block of 4096, times the
    block's base**(4096*j); a single cumulative product over millions of entries is far slower."""
    block_len = 4096
    block = np.full(block_len, base, dtype=np.uint64)
    block[0] = 1
    block = np.cumprod(block)  # uint64 products wrap modulo 2**64, which is the arithmetic wanted
    with np.errstate(over="ignore"):
        step = block[-1] * base
    blocks = np.full(-(-n // block_len), step, dtype=np.uint64)
    blocks[0] = 1
    blocks = np.cumprod(blocks)
    with np.errstate(over="ignore"):
        return np.multiply.outer(blocks, block).ravel()[:n]


_POWERS = _Powers()


#: rows hashed at a time: keeps the power tables (8 bytes per key byte, twice) small
HASH_SLICE_ROWS = 65536


def _hash_binary(arr: pa.Array) -> np.ndarray:
    """Hash of each value's bytes, a slice of rows at a time."""
    if len(arr) <= HASH_SLICE_ROWS:
        return _hash_binary_slice(arr)
    return np.concatenate([
        _hash_binary_slice(arr.slice(i, HASH_SLICE_ROWS)) for i in range(0, len(arr), HASH_SLICE_ROWS)
    ])


def _hash_binary_slice(arr: pa.Array) -> np.ndarray:
    """Polynomial hash of each value's bytes (sum of byte * base**position), then mixed with its
    length. Computed for all values at once: prefix sums of byte * base**global_position, the
    difference over a value's span, shifted back to position 0 by base**-start."""
    large = pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type)
    offsets_type = np.int64 if large else np.int32
    arr = arr.cast(pa.large_binary() if large else pa.binary())
    n = len(arr)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=offsets_type, count=n + 1,
                            offset=arr.offset * np.dtype(offsets_type).itemsize).astype(np.int64)
    start, end = int(offsets[0]), int(offsets[-1])
    rel = offsets - start
    data = np.frombuffer(bufs[2], dtype=np.uint8)[start:end] if bufs[2] is not None else np.empty(0, np.uint8)
    up, down = _POWERS.get(len(data) + 1)
    prefix = np.zeros(len(data) + 1, dtype=np.uint64)
    np.cumsum(data * up[: len(data)], out=prefix[1:])
    lengths = np.diff(rel)
    with np.errstate(over="ignore"):
        h = (prefix[rel[1:]] - prefix[rel[:-1]]) * down[rel[:-1]]
        return _splitmix(h + lengths.astype(np.uint64) * _GOLDEN + _GOLDEN)


def _hash_column(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    t = col.type
    if pa.types.is_dictionary(t):
        return _hash_column(col.dictionary)[np.asarray(col.indices.fill_null(0))] if len(col) else np.empty(0, np.uint64)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        h = _hash_binary(col)
    elif pa.types.is_integer(t) or pa.types.is_temporal(t) or pa.types.is_boolean(t):
        if pa.types.is_temporal(t):
            col = col.cast(pa.int64())
        elif pa.types.is_boolean(t):
            col = col.cast(pa.int8())
        values = np.asarray(col.fill_null(0)).astype(np.int64).view(np.uint64)
        h = _splitmix(values ^ _GOLDEN)
    elif pa.types.is_floating(t):
        values = np.asarray(col.cast(pa.float64()).fill_null(0.0)) + 0.0  # -0.0 and 0.0 are one key
        h = _splitmix(values.view(np.uint64))
    else:
        raise TypeError(f"cannot use a column of type {t} as a key")
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
    order = np.argsort(who, kind="stable")
    counts = np.bincount(who, minlength=parallelism)
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
