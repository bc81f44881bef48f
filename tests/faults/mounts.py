"""Small file systems a test owns: a tmpfs that can be made read-only, filled up, and restored.

We run as root, so chmod does not stop a write; a mount does. Guarantees:

- `Tmpfs.mount()` mounts a fresh tmpfs of the given size on an empty directory, or raises
  `MountNotPermitted` (the caller skips, naming why);
- `read_only()` turns every new open, create, rename and unlink under it into EROFS at once, even
  while files are open for writing (a plain `remount,ro` refuses then: "mount point is busy").
  It stacks a bind mount of the directory on itself and makes that one read-only: new path
  lookups see the same files through the read-only mount; descriptors opened before keep
  writing, as after a file system that turned read-only under a running program;
- `fill()` takes every free byte (ENOSPC for every write, also through open descriptors);
- `restore()` undoes both; `unmount()` removes every mount this object made (always called).
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

MOUNT_TIMEOUT_S = 10.0
FILLER_NAME = ".filler"  # a dot name: never mistaken for committed output or a checkpoint
FILL_CHUNK = 1 << 16


class MountNotPermitted(RuntimeError):
    """This process may not mount (not root, or no CAP_SYS_ADMIN in this container)."""


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=MOUNT_TIMEOUT_S)


class Tmpfs:
    """One tmpfs mounted by a test at `path`."""

    def __init__(self, path: Path, size_bytes: int) -> None:
        self.path = Path(path)
        self.size_bytes = size_bytes
        self._layers = 0  # mounts stacked on `path` by this object
        self._filled = False

    def mount(self) -> Tmpfs:
        self.path.mkdir(parents=True, exist_ok=True)
        r = _run("mount", "-t", "tmpfs", "-o", f"size={self.size_bytes},mode=0755", "tmpfs", str(self.path))
        if r.returncode != 0:
            raise MountNotPermitted(f"mount -t tmpfs on {self.path} failed: {r.stderr.strip() or r.returncode}")
        self._layers = 1
        return self

    def read_only(self) -> None:
        """Every new write under the mount fails with EROFS from now on."""
        r = _run("mount", "--bind", str(self.path), str(self.path))
        if r.returncode != 0:
            raise MountNotPermitted(f"bind mount of {self.path} failed: {r.stderr.strip()}")
        self._layers += 1
        r = _run("mount", "-o", "remount,bind,ro", str(self.path))
        if r.returncode != 0:
            raise MountNotPermitted(f"remount read-only of {self.path} failed: {r.stderr.strip()}")

    def fill(self) -> None:
        """Write a filler file until the file system is full (unbuffered: every byte lands)."""
        fd = os.open(self.path / FILLER_NAME, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._filled = True
        try:
            for size in (FILL_CHUNK, 1):  # big chunks, then the last bytes one by one
                block = b"\0" * size
                while True:
                    try:
                        os.write(fd, block)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        finally:
            os.close(fd)

    def restore(self) -> None:
        """Writable and with free space again (idempotent)."""
        while self._layers > 1:
            r = _run("umount", str(self.path))
            if r.returncode != 0:
                raise RuntimeError(f"umount of the read-only layer on {self.path} failed: {r.stderr.strip()}")
            self._layers -= 1
        if self._filled:
            (self.path / FILLER_NAME).unlink(missing_ok=True)
            self._filled = False

    def unmount(self) -> None:
        """Remove every mount made here; lazily if a process still has files open under it."""
        while self._layers > 0:
            r = _run("umount", str(self.path))
            if r.returncode != 0:
                r = _run("umount", "-l", str(self.path))
            if r.returncode != 0 and not os.path.ismount(self.path):
                break
            self._layers -= 1
