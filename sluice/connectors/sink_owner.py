"""Which job owns a sink's output directory: one owner marker inside the directory.

A files sink's ``path`` belongs to the first job that compiles with it. The proof is the marker
file :data:`OWNER_MARKER` in the directory itself (its name starts with ``_``, so it is never
committed output), holding ``{"job_id": ..., "claimed_at": ...}`` as JSON.

Guarantees of :func:`claim_path`:

* exactly one job wins a path, also when several claim it at the same moment: the marker is
  written completely to a private temporary file, fsynced, and then published with ``os.link``,
  which creates the marker atomically and fails if it exists (the same all-or-nothing effect as
  ``O_CREAT | O_EXCL``, but a reader never sees a half-written marker);
* the owner keeps the path for good: every later claim by the same job id (a new run after
  Stopped, a restart, ``ignore_state``) succeeds, a claim by any other job raises
  :class:`SinkPathOwned`;
* a path inside another job's path, or one containing another job's path, is refused too (the
  owner's committed output is every file under its path, recursively);
* the marker lives in the directory, so two spellings of one directory (symlinks) share it.

Releasing a path is a user's act: delete the marker (or the whole directory with the owner's
output) when no job writes there any more.
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import UTC, datetime

from sluice.errors import UserError
from sluice.fsutil import fsync_dir

#: the owner marker's file name inside a sink path (leading '_': not committed output)
OWNER_MARKER = "_sluice_owner.json"
#: prefix of the temporary file a claim writes before linking it to the marker ('.': hidden)
_CLAIM_TMP_PREFIX = ".sluice_owner-"
#: how often a claim reads-or-creates the marker before giving up (it only repeats when the
#: marker is deleted between being created and being read)
CLAIM_ATTEMPTS = 3


class SinkPathOwned(UserError):
    """A sink path (or a directory around or inside it) is owned by another job."""

    def __init__(self, requested: str, owned: str | None, owner: str, job_id: str, *, inside: bool = False) -> None:
        """`requested`: the path `job_id` asked for; `owned`: the owner's directory when it is
        another one (`inside`: `requested` lies within it; else `requested` contains it)."""
        self.requested, self.owned, self.owner, self.job_id = requested, owned or requested, owner, job_id
        marker = marker_path(self.owned)
        if owned is None:
            where = f"sink path {requested!r} belongs to job {owner!r}"
        elif inside:
            where = f"sink path {requested!r} is inside {owned!r}, which belongs to job {owner!r}"
        else:
            where = f"sink path {requested!r} contains {owned!r}, which belongs to job {owner!r}"
        super().__init__(
            f"{where} (owner marker {marker}), so job {job_id!r} may not write there: use another "
            f"path, or, once {owner!r} no longer runs, delete its output there (or just the marker)"
        )


class UnreadableOwnerMarker(UserError):
    """An owner marker exists but does not name a job (damaged or written by hand)."""


def marker_path(path: str) -> str:
    """The owner marker of the sink directory `path`."""
    return os.path.join(path, OWNER_MARKER)


def owner_of(path: str) -> str | None:
    """The job id in `path`'s owner marker, or None when there is no marker.

    Raises :class:`UnreadableOwnerMarker` when a marker is there but names no job.
    """
    marker = marker_path(path)
    try:
        with open(marker, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        return None
    try:
        owner = json.loads(text)["job_id"]
    except (ValueError, KeyError, TypeError):
        owner = None
    if not isinstance(owner, str) or not owner:
        raise UnreadableOwnerMarker(
            f"sink path {path!r}: owner marker {marker} does not name a job ({text[:80]!r}); "
            "delete it if no job writes there any more"
        )
    return owner


def claim_path(path: str, job_id: str) -> None:
    """Make `job_id` the owner of sink directory `path` (created if missing), or confirm it is.

    Idempotent for the owner. Raises :class:`SinkPathOwned` when another job owns `path`, a
    directory above it, or a directory below it; :class:`UnreadableOwnerMarker` for a damaged
    marker. Safe against concurrent claims: exactly one job ever becomes the owner of a path.
    Confirming an existing ownership reads a few small files only (it runs before every commit).
    """
    path = os.path.abspath(path)
    real = os.path.realpath(path)
    _refuse_foreign_ancestor(path, real, job_id)  # first: never create a directory in another's
    os.makedirs(path, exist_ok=True)
    for _ in range(CLAIM_ATTEMPTS):
        owner = owner_of(path)
        created = False
        if owner is None:
            created = _create_marker(path, job_id)
            owner = owner_of(path)
        if owner is not None:
            break
    else:  # the marker kept vanishing right after being written: someone deletes it as we claim
        raise OSError(f"sink path {path!r}: the owner marker {marker_path(path)} keeps disappearing")
    if owner != job_id:
        raise SinkPathOwned(path, None, owner, job_id)
    if created:
        # Nested paths are checked once, by the claim that creates the marker, and after creating
        # it: of two jobs claiming nested paths at the same moment, at least one sees the other.
        try:
            _refuse_foreign_ancestor(path, real, job_id)
            _refuse_foreign_descendant(path, real, job_id)
        except SinkPathOwned:
            os.unlink(marker_path(path))  # give back what this claim just took
            raise


def _create_marker(path: str, job_id: str) -> bool:
    """Publish a marker naming `job_id` unless one exists; True if this call created it."""
    body = json.dumps({"job_id": job_id, "claimed_at": datetime.now(UTC).isoformat()}) + "\n"
    tmp = os.path.join(path, f"{_CLAIM_TMP_PREFIX}{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            os.write(fd, body.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, marker_path(path))  # atomic; fails if another claim got there first
        except FileExistsError:
            return False
        fsync_dir(path)
        return True
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def _refuse_foreign_ancestor(path: str, real: str, job_id: str) -> None:
    parent = os.path.dirname(real)
    while True:
        owner = _owner_quiet(parent)
        if owner is not None and owner != job_id:
            raise SinkPathOwned(path, parent, owner, job_id, inside=True)
        up = os.path.dirname(parent)
        if up == parent:
            return
        parent = up


def _refuse_foreign_descendant(path: str, real: str, job_id: str) -> None:
    # Only directories that can hold committed output are searched ('.'/'_' ones are skipped, as
    # by readers of the output); the sink itself writes no subdirectories, so this stays small.
    for root, dirs, _files in os.walk(real):
        dirs[:] = [d for d in dirs if not d.startswith((".", "_"))]
        if root == real:
            continue
        owner = _owner_quiet(root)
        if owner is not None and owner != job_id:
            raise SinkPathOwned(path, root, owner, job_id)


def _owner_quiet(path: str) -> str | None:
    """`owner_of` for directories around a sink path: unreadable or damaged markers count as
    foreign owners only when they name a job."""
    try:
        return owner_of(path)
    except (UnreadableOwnerMarker, OSError):
        return None
