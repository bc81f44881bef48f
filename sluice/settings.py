"""Where sluice keeps its files on this machine: the state directory and what lives under it."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

STATE_DIR_ENV = "SLUICE_STATE_DIR"
SECRET_ENV = "SLUICE_SECRET"
DEFAULT_STATE_DIR = ".sluice"


def state_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The state directory: `override`, else $SLUICE_STATE_DIR, else `.sluice` in the cwd."""
    raw = override or os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR
    return Path(raw).expanduser().resolve()


def default_checkpoint_url(base: Path) -> str:
    """Checkpoints go under the state directory unless the job names a store."""
    return str(base / "checkpoints")


def runners_dir(base: Path) -> Path:
    """Where the process scheduler keeps runner info files and logs."""
    return base / "runners"


def load_secret(base: Path) -> bytes:
    """The secret that controller workers and schedulers share to derive runner tokens.

    $SLUICE_SECRET wins; otherwise a random secret is created once in `<state dir>/secret`
    (mode 0600). It is never written into workflow history.
    """
    env = os.environ.get(SECRET_ENV)
    if env:
        return env.encode()
    path = base / "secret"
    if not path.exists():
        base.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".secret.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        try:
            os.link(tmp, path)  # first writer wins; a concurrent one reads the winner's secret
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return path.read_text().strip().encode()
