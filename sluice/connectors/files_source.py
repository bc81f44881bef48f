"""The ``files`` source (``type: files``, ``role: source``): a directory of JSON Lines, CSV or Parquet.

Splits. ``path`` is a local directory; every regular file directly in it whose name does not start
with ``.`` or ``_`` is one split, identified by its name (relative to ``path``). Subtask
``i`` of ``p`` owns the files with ``zlib.crc32(name) % p == i``: ownership depends on nothing but
the name, so files appearing later (``follow``) never move existing files between subtasks. A
subtask reads its files one at a time, in name order, in batches of at most ``batch_size`` rows,
streaming (a file is never loaded whole):

* ``jsonl``: one JSON object per line (blank lines are skipped); a block of lines is parsed at a
  time by ``pyarrow.json``. Errors name the file's line number (1-based, blank lines counted).
* ``csv``: a header row, then records, read by ``pyarrow.csv.open_csv`` (quoted newlines allowed).
  Errors name the row: CSV records counted from 1, the header being row 1.
* ``parquet``: ``ParquetFile.iter_batches``; a restore skips whole row groups. Row numbers from 1.

State. The snapshot is a table ``(file: string, offset: int64, done: bool)`` -- rows already
emitted of every owned file the subtask knows. On restore the tables of every previous subtask are
given (the parallelism may have changed): the subtask keeps the entries of the files it owns now
and resumes each at its offset, so a rescale neither loses nor repeats a row. A file name is read
once: a file whose entry says ``done`` is never read again, even if it is replaced.

Types. With ``schema`` (column -> int64|float64|string|bool|timestamp) the batches have exactly
those columns, in that order, converted by :mod:`sluice.connectors.coerce` (timestamps become
``timestamp[ms]``; ISO-8601 text and epoch milliseconds are both accepted); every declared column
must be present in every row (a JSON ``null`` or an empty CSV cell is a null value). Without
``schema`` the columns and types are inferred by pyarrow (per file for CSV and Parquet, per block of
lines for JSON Lines, so declare a schema when types must be stable).

Event time. ``event_time`` names a timestamp column (it must be present and non-null in every
row). Every owned file not yet done is a split of a
:class:`~sluice.engine.watermarks.WatermarkTracker` with ``out_of_orderness_ms``: a file not read
yet holds the watermark back, a finished one no longer does.

End. Without ``follow`` the directory is listed once, at open, and the source is finished once all
its files are done. With ``follow`` it lists the directory again every ``poll_interval_s`` once it
has read everything, and never finishes; a file must be complete when it appears under a visible
name (write it as ``.name`` or ``_name`` and rename it).

Errors. Input that cannot be read as declared (a malformed line, a value that is not of the
declared type, a missing column) raises :class:`InputError`, a :class:`sluice.errors.UserError`
that is not retryable: re-reading the same bytes fails the same way.
"""

from __future__ import annotations

import io
import json
import os
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.json as pjson
import pyarrow.parquet as pq

from sluice.connectors.coerce import ARROW_TYPES, ConversionError, convert
from sluice.engine.operators import OperatorContext, OperatorState
from sluice.engine.sources import FINISHED, Poll, Source
from sluice.engine.watermarks import WatermarkTracker
from sluice.errors import UserError
from sluice.models import FilesSourceOperator

STATE_SCHEMA = pa.schema([("file", pa.string()), ("offset", pa.int64()), ("done", pa.bool_())])
#: offending input is quoted in messages up to this many characters
QUOTE_CHARS = 200
#: lines read at a time while skipping the rows emitted before a restore
SKIP_CHUNK_LINES = 65536
#: the shortest idle time a following source asks for
MIN_IDLE_S = 1e-3


class InputError(UserError):
    """A file's content cannot be read as declared. Not retryable: the same bytes fail again.

    The message names the file, where in it (line or row, when known) and the offending value.
    """

    #: the task turns an operator's UserError into a failure of domain `user` that is not retried
    #: (``SubtaskRunner._error``); these attributes say the same to anything that reads them, as
    #: ``UserFunctionError.retryable`` does
    retryable = False
    domain = "user"

    def __init__(self, file: str, where: str | None, problem: str) -> None:
        super().__init__(f"file {file!r}{' ' + where if where else ''}: {problem}")
        self.file = file
        self.where = where
        self.problem = problem


def _quote(raw: bytes | str) -> str:
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    text = text.rstrip("\r\n")
    if len(text) > QUOTE_CHARS:
        text = text[:QUOTE_CHARS] + "..."
    return repr(text)


def owner_of(name: str, parallelism: int) -> int:
    """The subtask index that reads file `name` (relative to the source's path)."""
    return zlib.crc32(name.encode("utf-8")) % parallelism


def list_files(path: str) -> list[str]:
    """Names of the splits in directory `path`: regular files not starting with '.' or '_', sorted."""
    names: list[str] = []
    with os.scandir(path) as entries:
        for e in entries:
            if not e.name.startswith((".", "_")) and e.is_file():
                names.append(e.name)
    return sorted(names)


# ---------------------------------------------------------------- conforming batches


@dataclass(slots=True)
class _Shape:
    """What a batch must look like: declared columns (None = inferred) and the event-time column.

    With inferred types, `inferred` remembers the first concrete type seen per column, so that a
    later block whose column is all null, or of a type that casts losslessly (int64 -> double), is
    given that type instead of a new one.
    """

    declared: Mapping[str, str] | None
    event_time: str | None
    inferred: dict[str, pa.DataType] = field(default_factory=dict)

    def stabilise(self, name: str, arr: pa.Array) -> pa.Array:
        """`arr` (an inferred column) in the type first seen for `name`, when that is lossless."""
        known = self.inferred.get(name)
        if known is None:
            if not pa.types.is_null(arr.type):
                self.inferred[name] = arr.type
            return arr
        if arr.type.equals(known):
            return arr
        if pa.types.is_null(arr.type):
            return pa.nulls(len(arr), known)
        numeric = pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)
        same_family = (
            (numeric and (pa.types.is_integer(known) or pa.types.is_floating(known)))
            or (pa.types.is_timestamp(arr.type) and pa.types.is_timestamp(known))
        )
        if not same_family:
            return arr
        try:
            return arr.cast(known)  # safe cast: fails rather than lose information
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            return arr


def _conform(table: pa.Table, shape: _Shape, file: str, where: Callable[[int], str]) -> pa.RecordBatch:
    """`table` with the declared columns converted (or as inferred), event time checked.

    `where(i)` names row i of the table in messages (``line 12``, ``row 7``).
    """
    if shape.declared is not None:
        wanted = shape.declared
    else:
        wanted = {name: "" for name in table.column_names}
        if shape.event_time is not None:
            wanted[shape.event_time] = "timestamp"
    arrays: list[pa.Array] = []
    for name, kind in wanted.items():
        if name not in table.column_names:
            raise InputError(file, where(0), f"missing column {name!r}")
        col = table.column(name)
        if kind:
            try:
                arr = convert(col, kind)
            except ConversionError as exc:
                raise InputError(file, f"{where(exc.index)} column {name!r}", str(exc)) from None
        else:
            arr = shape.stabilise(name, col.combine_chunks() if col.num_chunks != 1 else col.chunk(0))
        if name == shape.event_time and arr.null_count:
            i = pc.index(pc.is_null(arr), True).as_py()
            raise InputError(file, f"{where(i)} column {name!r}", "event time is null")
        arrays.append(arr)
    return pa.RecordBatch.from_arrays(arrays, names=list(wanted))


# ---------------------------------------------------------------- readers, one per format


class FileReader:
    """Reads one file from row `start_row` on, as conformed batches. One instance per file read."""

    def __init__(self, path: str, display: str, start_row: int, shape: _Shape) -> None:
        self.path = path
        self.display = display
        self.start_row = start_row
        self.shape = shape

    def read(self, max_rows: int) -> pa.RecordBatch | None:
        """The next 1..max_rows rows, or None at the end of the file."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the file; never raises."""


@dataclass(slots=True)
class _Lines:
    """A block of non-blank JSON lines and their 1-based line numbers in the file."""

    raws: list[bytes]
    numbers: Sequence[int]

    def __len__(self) -> int:
        return len(self.raws)

    def __getitem__(self, i: int) -> tuple[int, bytes]:
        return self.numbers[i], self.raws[i]

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        return zip(self.numbers, self.raws)


class JsonlReader(FileReader):
    """JSON Lines: blocks of up to ``max_rows`` non-blank lines parsed by ``pyarrow.json``."""

    def __init__(self, path: str, display: str, start_row: int, shape: _Shape) -> None:
        super().__init__(path, display, start_row, shape)
        self._file: BinaryIO = open(path, "rb")  # noqa: SIM115 - open until close()
        self._lineno = 0
        explicit = {c: pa.string() for c, k in (shape.declared or {}).items() if k == "string"}
        self._parse_options = pjson.ParseOptions(
            explicit_schema=pa.schema(list(explicit.items())) if explicit else None,
            unexpected_field_behavior="infer",
        )
        if start_row:
            self._skip(start_row)

    def _skip(self, rows: int) -> None:
        """Pass over the first `rows` non-blank lines (rows emitted before a restore)."""
        while rows > 0:
            chunk = list(islice(self._file, min(rows, SKIP_CHUNK_LINES)))
            if not chunk:
                return
            self._lineno += len(chunk)
            blank = sum(map(bytes.isspace, chunk))
            rows -= len(chunk) - blank

    def _lines(self, n: int) -> _Lines:
        """The next up to `n` non-blank lines, newline-terminated, with their line numbers."""
        raws: list[bytes] = []
        parts: list[Sequence[int]] = []
        while len(raws) < n:
            chunk = list(islice(self._file, n - len(raws)))
            if not chunk:
                break
            first = self._lineno + 1
            self._lineno += len(chunk)
            if not chunk[-1].endswith(b"\n"):
                chunk[-1] += b"\n"
            if any(map(bytes.isspace, chunk)):  # rare: drop blank lines, number the rest one by one
                kept = [i for i, raw in enumerate(chunk) if not raw.isspace()]
                parts.append([first + i for i in kept])
                raws.extend(chunk[i] for i in kept)
            else:
                parts.append(range(first, first + len(chunk)))
                raws.extend(chunk)
        numbers: Sequence[int] = parts[0] if len(parts) == 1 else [k for part in parts for k in part]
        return _Lines(raws, numbers)

    def read(self, max_rows: int) -> pa.RecordBatch | None:
        lines = self._lines(max_rows)
        if not lines:
            return None
        block = b"".join(lines.raws)
        try:
            table = pjson.read_json(
                io.BytesIO(block),
                read_options=pjson.ReadOptions(use_threads=False, block_size=len(block) + 1),
                parse_options=self._parse_options,
            )
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            table = self._slow_path(lines, exc)
        else:
            if table.num_rows != len(lines):  # pragma: no cover - pyarrow reads one row per line
                table = self._slow_path(lines, ValueError(f"{table.num_rows} rows from {len(lines)} lines"))
            else:
                self._check_present(table, lines)
        return _conform(table, self.shape, self.display, lambda i: f"line {lines.numbers[i]}")

    def _check_present(self, table: pa.Table, lines: _Lines) -> None:
        """Every declared column must be a key of every object (null is a value, absence is not)."""
        for name in self.shape.declared or {}:
            if name not in table.column_names:
                lineno, raw = lines[0]
                raise InputError(self.display, f"line {lineno}", f"missing column {name!r} in {_quote(raw)}")
            col = table.column(name)
            if not col.null_count:
                continue
            for i in pc.indices_nonzero(pc.is_null(col)).to_pylist():
                lineno, raw = lines[i]
                if name not in json.loads(raw):
                    raise InputError(self.display, f"line {lineno}", f"missing column {name!r} in {_quote(raw)}")

    def _slow_path(self, lines: _Lines, exc: Exception) -> pa.Table:
        """pyarrow refused the block. Parse it line by line in Python: raise an InputError naming the
        offending line, or build the table when the block is valid but beyond pyarrow's inference
        (a declared or event-time column mixing kinds, e.g. ISO text and epoch milliseconds)."""
        objects: list[tuple[int, bytes, dict[str, Any]]] = []
        for lineno, raw in lines:
            try:
                obj = json.loads(raw)
            except ValueError:
                raise InputError(self.display, f"line {lineno}", f"cannot parse {_quote(raw)} as JSON") from None
            if not isinstance(obj, dict):
                raise InputError(self.display, f"line {lineno}", f"{_quote(raw)} is not a JSON object")
            objects.append((lineno, raw, obj))
        declared = self.shape.declared
        typed = dict(declared) if declared is not None else {}
        if declared is None and self.shape.event_time is not None:
            typed[self.shape.event_time] = "timestamp"
        if declared is not None:
            for name in declared:
                for lineno, raw, obj in objects:
                    if name not in obj:
                        raise InputError(self.display, f"line {lineno}", f"missing column {name!r} in {_quote(raw)}")
            names = list(declared)
        else:
            first: dict[str, tuple[str, int]] = {}
            for lineno, _, obj in objects:
                for name, value in obj.items():
                    if value is None or name in typed:
                        first.setdefault(name, ("", lineno))
                        continue
                    kind = _json_kind(value)
                    seen = first.setdefault(name, (kind, lineno))
                    if not seen[0]:
                        first[name] = seen = (kind, lineno)
                    if seen[0] != kind:
                        raise InputError(
                            self.display, f"line {lineno} column {name!r}",
                            f"{value!r} is a JSON {kind} but line {seen[1]} has a {seen[0]} "
                            "(declare the column's type in `schema`)",
                        )
            names = list(first)
        columns: dict[str, pa.Array] = {}
        for name in names:
            values = [obj.get(name) for _, _, obj in objects]
            try:
                columns[name] = _typed_column(values, typed[name]) if name in typed else pa.array(values)
            except ConversionError as err:
                raise InputError(self.display, f"line {objects[err.index][0]} column {name!r}", str(err)) from None
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError) as err:
                raise InputError(self.display, f"lines {lines[0][0]}-{lines[-1][0]} column {name!r}",
                                 f"cannot read as JSON lines: {err} (pyarrow: {exc})") from None
        if not columns:  # every object is {}: rows without columns
            return pa.table({"_": pa.nulls(len(objects))}).drop_columns(["_"])
        return pa.table(columns)

    def close(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass


def _typed_column(values: list[Any], kind: str) -> pa.Array:
    """Python values of one column, possibly of several JSON kinds, converted to `kind` (each kind
    separately, then put back in order). ConversionError indices refer to `values`."""
    groups: dict[type, list[int]] = {}
    for i, v in enumerate(values):
        groups.setdefault(type(v), []).append(i)
    parts: list[pa.Array] = []
    order: list[int] = []
    for idxs in groups.values():
        try:
            arr = pa.array([values[i] for i in idxs])
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
            raise ConversionError(idxs[0], values[idxs[0]], kind) from None
        try:
            parts.append(convert(arr, kind))
        except ConversionError as err:
            raise ConversionError(idxs[err.index], err.value, kind) from None
        order.extend(idxs)
    if not parts:
        return pa.nulls(0, ARROW_TYPES[kind])
    combined = pa.concat_arrays(parts)
    inverse = [0] * len(order)
    for position, i in enumerate(order):
        inverse[i] = position
    return combined.take(pa.array(inverse, pa.int64()))


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


class CsvReader(FileReader):
    """CSV with a header row, streamed by ``pyarrow.csv.open_csv``; declared columns are read as
    text and converted here (so a bad value is reported with its row)."""

    def __init__(self, path: str, display: str, start_row: int, shape: _Shape) -> None:
        super().__init__(path, display, start_row, shape)
        self._invalid: pcsv.InvalidRow | None = None
        self._consumed = 0  # data rows returned or skipped
        self._buffer: list[pa.RecordBatch] = []
        self._buffered = 0
        self._eof = False
        # Declared columns (and an undeclared event-time column, which may mix epoch milliseconds
        # and ISO text) are read as text and converted by _conform, which names the bad row.
        as_text = {c: pa.string() for c in shape.declared or {}}
        if shape.event_time is not None:
            as_text[shape.event_time] = pa.string()
        try:
            self._reader: pcsv.CSVStreamingReader | None = pcsv.open_csv(
                path,
                read_options=pcsv.ReadOptions(use_threads=False),
                parse_options=pcsv.ParseOptions(newlines_in_values=True, invalid_row_handler=self._on_invalid),
                convert_options=pcsv.ConvertOptions(
                    column_types=as_text, strings_can_be_null=False
                ),
            )
        except pa.ArrowInvalid as exc:
            if "Empty CSV file" in str(exc):
                self._reader, self._eof = None, True
                return
            raise self._error(exc) from None
        names = self._reader.schema.names
        for c in shape.declared or {}:
            if c not in names:
                raise InputError(display, "row 1", f"missing column {c!r} in the header ({', '.join(names)})")
        if shape.event_time is not None and shape.event_time not in names:
            raise InputError(
                display, "row 1", f"missing column {shape.event_time!r} in the header ({', '.join(names)})"
            )
        while self._consumed < start_row and self._fill(start_row - self._consumed):
            take = min(self._buffered, start_row - self._consumed)
            self._take(take)

    def _on_invalid(self, row: pcsv.InvalidRow) -> str:
        if self._invalid is None:
            self._invalid = row
        return "error"

    def _error(self, exc: Exception) -> InputError:
        row, self._invalid = self._invalid, None
        if row is not None:
            where = (
                f"row {row.number}" if row.number is not None else f"after row {self._consumed + self._buffered + 1}"
            )
            return InputError(self.display, where,
                              f"expected {row.expected_columns} columns, got {row.actual_columns}: {_quote(row.text)}")
        return InputError(self.display, f"after row {self._consumed + self._buffered + 1}", str(exc))

    def _fill(self, n: int) -> bool:
        """Buffer at least `n` rows if the file has them; False when nothing is buffered."""
        while self._buffered < n and not self._eof:
            assert self._reader is not None
            try:
                batch = self._reader.read_next_batch()
            except StopIteration:
                self._eof = True
                break
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
                raise self._error(exc) from None
            if batch.num_rows:
                self._buffer.append(batch)
                self._buffered += batch.num_rows
        return self._buffered > 0

    def _take(self, n: int) -> pa.Table:
        table = pa.Table.from_batches(self._buffer)
        head, rest = table.slice(0, n), table.slice(n)
        self._buffer = rest.to_batches() if rest.num_rows else []
        self._buffered = rest.num_rows
        self._consumed += n
        return head

    def read(self, max_rows: int) -> pa.RecordBatch | None:
        if not self._fill(max_rows):
            return None
        first = self._consumed + 2  # the header is row 1
        table = self._take(min(max_rows, self._buffered))
        return _conform(table, self.shape, self.display, lambda i: f"row {first + i}")

    def close(self) -> None:
        self._reader = None
        self._buffer = []


class ParquetReader(FileReader):
    """Parquet through ``ParquetFile.iter_batches``; a restore starts at the right row group."""

    def __init__(self, path: str, display: str, start_row: int, shape: _Shape) -> None:
        super().__init__(path, display, start_row, shape)
        try:
            self._file = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(display, None, f"not a readable Parquet file: {exc}") from None
        names = self._file.schema_arrow.names
        needed = list(shape.declared or {})
        if shape.event_time is not None and shape.event_time not in needed:
            needed.append(shape.event_time)
        for c in needed:
            if c not in names:
                raise InputError(display, None, f"missing column {c!r} (the file has {', '.join(names)})")
        md = self._file.metadata
        group, before = 0, 0
        while group < md.num_row_groups and before + md.row_group(group).num_rows <= start_row:
            before += md.row_group(group).num_rows
            group += 1
        self._groups = list(range(group, md.num_row_groups))
        self._skip = start_row - before
        self._position = before  # rows of the file before the next batch
        self._batches: Any = None
        self._columns = list(shape.declared) if shape.declared is not None else None

    def read(self, max_rows: int) -> pa.RecordBatch | None:
        if self._batches is None:
            if not self._groups:
                return None
            self._batches = self._file.iter_batches(batch_size=max_rows, row_groups=self._groups,
                                                    columns=self._columns, use_threads=False)
        while True:
            try:
                batch = next(self._batches)
            except StopIteration:
                return None
            except (pa.ArrowInvalid, OSError) as exc:
                raise InputError(
                    self.display, f"after row {self._position}", f"cannot read Parquet data: {exc}"
                ) from None
            if self._skip:
                drop = min(self._skip, batch.num_rows)
                batch = batch.slice(drop)
                self._skip -= drop
                self._position += drop
            if batch.num_rows:
                break
        first = self._position + 1
        self._position += batch.num_rows
        return _conform(pa.Table.from_batches([batch]), self.shape, self.display, lambda i: f"row {first + i}")

    def close(self) -> None:
        try:
            self._file.close()
        except (OSError, AttributeError):
            pass


READERS: dict[str, type[FileReader]] = {"jsonl": JsonlReader, "csv": CsvReader, "parquet": ParquetReader}


# ---------------------------------------------------------------- the source


@dataclass(slots=True)
class FileProgress:
    """What one owned file has given: rows emitted so far, and whether it is exhausted."""

    offset: int = 0
    done: bool = False


class FilesSource(Source):
    """Reads the files of a directory it owns by name hash; offsets checkpointed per file."""

    type_name = "files"

    def __init__(self, operator_id: str, params: dict[str, Any]) -> None:
        super().__init__(operator_id, params)
        self.spec = FilesSourceOperator.model_validate(params)
        self.path = os.path.abspath(self.spec.path)
        declared = dict(self.spec.columns_) if self.spec.columns_ is not None else None
        et = self.spec.event_time
        if et is not None and declared is not None:
            if et not in declared:
                raise UserError(f"files source {operator_id!r}: event_time column {et!r} is not in its schema")
            if declared[et] != "timestamp":
                raise UserError(f"files source {operator_id!r}: event_time column {et!r} is declared "
                                f"{declared[et]}; it must be a timestamp")
        self.shape = _Shape(declared, et)
        self.files: dict[str, FileProgress] = {}
        self._pending: list[str] = []
        self._current: str | None = None
        self._reader: FileReader | None = None
        self._next_list: float | None = None
        self._watermarks = WatermarkTracker(self.spec.out_of_orderness_ms)

    def output_schema(self) -> pa.Schema | None:
        """The schema of every batch when ``schema`` is declared; None when inferred."""
        if self.shape.declared is None:
            return None
        return pa.schema([(c, ARROW_TYPES[k]) for c, k in self.shape.declared.items()])

    # ------------------------------------------------------------ splits

    def _owns(self, name: str) -> bool:
        assert self.ctx is not None
        return owner_of(name, self.ctx.parallelism) == self.ctx.subtask_index

    def _list(self) -> list[str]:
        try:
            return list_files(self.path)
        except FileNotFoundError:
            raise UserError(f"files source {self.operator_id!r}: directory {self.path!r} does not exist") from None
        except NotADirectoryError:
            raise UserError(f"files source {self.operator_id!r}: {self.path!r} is not a directory") from None

    def _discover(self) -> None:
        """List the directory; owned files not seen before start at offset 0."""
        for name in self._list():
            if name not in self.files and self._owns(name):
                self.files[name] = FileProgress()
        self._pending = sorted(n for n, p in self.files.items() if not p.done and n != self._current)
        for name in self._pending:
            self._watermarks.add_split(name)

    def open(self, ctx: OperatorContext, restored: list[pa.Table]) -> None:
        """List the directory (a missing directory is a UserError naming it) and take over the
        offsets of the restored files this subtask owns now."""
        super().open(ctx, restored)
        self.files = {}
        self._watermarks = WatermarkTracker(self.spec.out_of_orderness_ms)
        seen: dict[str, tuple[int, bool]] = {}
        for table in restored:
            for name, offset, done in zip(table.column("file").to_pylist(), table.column("offset").to_pylist(),
                                          table.column("done").to_pylist()):
                if name in seen and seen[name] != (offset, done):
                    raise ValueError(f"files source {self.operator_id!r}: file {name!r} restored twice, "
                                     f"at {seen[name]} and {(offset, done)}")
                seen[name] = (offset, done)
                if self._owns(name):
                    self.files[name] = FileProgress(int(offset), bool(done))
        self._discover()

    # ------------------------------------------------------------ reading

    def _open_next(self) -> None:
        name = self._pending.pop(0)
        progress = self.files[name]
        full = os.path.join(self.path, name)
        display = os.path.join(self.spec.path, name)
        try:
            self._reader = READERS[self.spec.format](full, display, progress.offset, self.shape)
        except FileNotFoundError:
            raise InputError(display, None, f"the file is gone ({progress.offset} of its rows were read)") from None
        self._current = name

    def _finish_current(self) -> None:
        assert self._current is not None and self._reader is not None
        self.files[self._current].done = True
        self._watermarks.finish(self._current)
        self._reader.close()
        self._reader, self._current = None, None

    def poll(self, now: float) -> Poll:
        """The next batch of the current file; the next file when it is exhausted; FINISHED (or,
        with ``follow``, idle until the next listing) when every owned file is done."""
        while True:
            if self._reader is None:
                if not self._pending:
                    if not self.spec.follow:
                        return FINISHED
                    if self._next_list is None:
                        self._next_list = now + self.spec.poll_interval_s  # open() has just listed
                    elif now >= self._next_list:
                        self._next_list = now + self.spec.poll_interval_s
                        self._discover()
                        if self._pending:
                            continue
                    return Poll(idle_s=max(self._next_list - now, MIN_IDLE_S))
                self._open_next()
            assert self._reader is not None and self._current is not None
            batch = self._reader.read(self.spec.batch_size)
            if batch is None:
                self._finish_current()
                continue
            self.files[self._current].offset += batch.num_rows
            if self.shape.event_time is not None:
                high = pc.max(batch.column(self.shape.event_time))
                self._watermarks.observe(self._current, high.cast(pa.int64()).as_py())
            return Poll(batch=batch)

    def is_idle(self) -> bool:
        """With ``follow``: every owned file is read (or none is owned) until new files appear."""
        return self.spec.follow and self._reader is None and not self._pending

    def watermark(self) -> int | None:
        """With ``event_time``: the lowest highest-event-time of the owned files not done (a file
        not started holds it back) minus ``out_of_orderness_ms``, when it advanced; else None."""
        if self.shape.event_time is None:
            return None
        return self._watermarks.advance()

    def snapshot(self, epoch: int) -> OperatorState:
        """``(file, offset, done)`` of every owned file known, sorted by name."""
        names = sorted(self.files)
        table = pa.table(
            {
                "file": pa.array(names, pa.string()),
                "offset": pa.array([self.files[n].offset for n in names], pa.int64()),
                "done": pa.array([self.files[n].done for n in names], pa.bool_()),
            },
            schema=STATE_SCHEMA,
        )
        return OperatorState(table=table)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
