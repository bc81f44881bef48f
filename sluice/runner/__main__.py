"""Entry point of a runner process: `python -m sluice.runner --job-id J --generation G ...`.

The bearer token comes from $SLUICE_RUNNER_TOKEN only (never the command line, which any local
user can read); it is removed from the environment right away so user functions and any process
they spawn do not inherit it. Exits 0 on SIGTERM/SIGINT, POST /shutdown or the orphan timeout,
2 on bad arguments.

Warm mode, `python -m sluice.runner --warm` (what `sluice.hosts.pool.WarmPool` starts): the process
imports everything a runner needs, writes `ready` on its stdout (then points stdout at stderr, so
only that line ever reaches the starter through it), and reads ONE line from stdin: a JSON
`sluice.runner.protocol.WarmAssignment` with the arguments a cold runner gets on its command line
and its token. From then on it is exactly a cold runner (its stdout/stderr redirected to the
assignment's `log_file`, stdin to /dev/null). EOF before any line (its pool closed) exits 0 quietly;
a malformed line exits 2 with a message on stderr that never echoes the line (it holds the token).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import pkgutil
import signal
import sys
from pathlib import Path

from pydantic import ValidationError

from sluice.auth import TOKEN_ENV
from sluice.runner.protocol import (
    MAX_ASSIGNMENT_LINE_BYTES,
    READY_LINE,
    WARM_FLAG,
    WarmAssignment,
    describe_validation_error,
)
from sluice.runner.server import DEFAULT_ORPHAN_TIMEOUT_S, RunnerServer

log = logging.getLogger("sluice.runner")

EXIT_BAD_ARGUMENTS = 2

# What a runner imports lazily on its first POST /start (engine, storage, wiring, pyarrow's compute
# kernels, connectors), imported up front by a warm runner so an assignment pays none of it.
WARM_MODULES: tuple[str, ...] = (
    "pyarrow",
    "pyarrow.compute",
    "numpy",
    "aiohttp",
    "aiohttp.web",
    "sluice.storage",
    "sluice.runner.wiring",
    "sluice.runner.client",
)
WARM_PACKAGES: tuple[str, ...] = ("sluice.engine",)
"""Every module of these packages is imported too (so a new engine module needs no entry here)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sluice.runner", description=__doc__)
    p.add_argument("--job-id", required=True)
    p.add_argument("--generation", type=int, required=True)
    p.add_argument("--runner-id", required=True)
    p.add_argument("--slots", type=int, required=True)
    p.add_argument("--info-file", type=Path, required=True)
    p.add_argument("--host", default="127.0.0.1", help="control API bind address (loopback default)")
    p.add_argument("--advertise-host", default=None, help="address written to the info file")
    p.add_argument("--port", type=int, default=0, help="control port; 0 = any free port")
    p.add_argument("--orphan-timeout", type=float, default=DEFAULT_ORPHAN_TIMEOUT_S)
    args = p.parse_args(argv)
    if args.slots < 1:
        p.error("--slots must be >= 1")
    if args.orphan_timeout <= 0:
        p.error("--orphan-timeout must be > 0")
    return args


async def amain(args: argparse.Namespace, token: str) -> int:
    server = RunnerServer(
        job_id=args.job_id,
        generation=args.generation,
        runner_id=args.runner_id,
        slots=args.slots,
        token=token,
        info_file=args.info_file,
        host=args.host,
        advertise_host=args.advertise_host,
        orphan_timeout_s=args.orphan_timeout,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_shutdown, signal.Signals(sig).name)
    # Exceptions in stray tasks are logged, never fatal: the runner keeps serving.
    loop.set_exception_handler(
        lambda _loop, ctx: log.error("unhandled: %s", ctx.get("message"), exc_info=ctx.get("exception"))
    )
    await server.start(port=args.port)
    return await server.serve_until_shutdown()


def run(args: argparse.Namespace, token: str) -> int:
    """Serve as the runner `args` describe until shutdown; the same for cold and warm starts."""
    logging.basicConfig(
        level=os.environ.get("SLUICE_LOG_LEVEL", "INFO").upper(),
        format=f"%(asctime)s %(levelname)s [{args.runner_id} g{args.generation}] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return asyncio.run(amain(args, token))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [WARM_FLAG]:
        return warm_main(argv)
    args = parse_args(argv)
    token = os.environ.pop(TOKEN_ENV, "")
    if not token:
        print(f"sluice.runner: ${TOKEN_ENV} is not set", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    return run(args, token)


# -------------------------------------------------------------------------------- warm mode


def warm_main(argv: list[str]) -> int:
    """Warm mode (see the module docstring): preload, say ready, wait for one assignment, serve."""
    if argv != [WARM_FLAG]:
        print(f"sluice.runner: {WARM_FLAG} takes no other arguments (they come on stdin)", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    # A token inherited by accident is never used (warm runners get theirs on stdin), and user
    # code must not see it.
    os.environ.pop(TOKEN_ENV, None)
    # Our stdout is the starter's readiness pipe: keep it for READY_LINE only, and send anything
    # else written to stdout (by an import, say) to stderr, the pool's log.
    ready_fd = os.dup(1)
    sys.stdout.flush()
    os.dup2(2, 1)
    preload()
    try:
        os.write(ready_fd, READY_LINE)
    except OSError:
        pass  # nobody listens for readiness (a manual start): the assignment line still counts
    finally:
        os.close(ready_fd)

    line = sys.stdin.buffer.readline(MAX_ASSIGNMENT_LINE_BYTES + 1)
    if not line:
        return 0  # the pool closed our stdin: never assigned, nothing to report
    if len(line) > MAX_ASSIGNMENT_LINE_BYTES:
        print(f"sluice.runner --warm: assignment line longer than {MAX_ASSIGNMENT_LINE_BYTES} bytes", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    try:
        assignment = WarmAssignment.model_validate_json(line)
    except ValidationError as e:
        # describe_validation_error names fields and reasons, never input values (the token).
        print(f"sluice.runner --warm: bad assignment line: {describe_validation_error(e)}", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    # Like a cold runner: nothing to read on stdin (user code must not block on the pool's pipe).
    _redirect(os.devnull, 0, os.O_RDONLY)
    if assignment.log_file is not None:
        try:
            _redirect_output(assignment.log_file)
        except OSError as e:
            print(f"sluice.runner --warm: cannot open log file {assignment.log_file}: {e}", file=sys.stderr)
            return EXIT_BAD_ARGUMENTS
    args = argparse.Namespace(
        job_id=assignment.job_id,
        generation=assignment.generation,
        runner_id=assignment.runner_id,
        slots=assignment.slots,
        info_file=assignment.info_file,
        host=assignment.host,
        advertise_host=assignment.advertise_host,
        port=assignment.port,
        orphan_timeout=assignment.orphan_timeout_s,
    )
    return run(args, assignment.token)


def preload() -> None:
    """Import what a runner would import on its first start; a module that cannot be imported
    is reported on stderr and skipped (a cold runner would only fail if a job used it)."""
    names = list(WARM_MODULES)
    for pkg_name in WARM_PACKAGES:
        try:
            pkg = importlib.import_module(pkg_name)
        except Exception as e:
            print(f"sluice.runner --warm: cannot preload {pkg_name}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        names.extend(m.name for m in pkgutil.iter_modules(pkg.__path__, pkg_name + "."))
    try:
        from sluice.connectors import SINKS, SOURCES

        names.extend(ref.partition(":")[0] for ref in (*SOURCES.values(), *SINKS.values()))
    except Exception as e:
        print(f"sluice.runner --warm: cannot preload connectors: {type(e).__name__}: {e}", file=sys.stderr)
    for name in dict.fromkeys(names):  # in order, once each
        try:
            importlib.import_module(name)
        except Exception as e:
            print(f"sluice.runner --warm: cannot preload {name}: {type(e).__name__}: {e}", file=sys.stderr)


def _redirect(path: str | Path, fd: int, flags: int) -> None:
    """Point file descriptor `fd` at `path` (opened with `flags`)."""
    new = os.open(path, flags, 0o644)
    try:
        os.dup2(new, fd)
    finally:
        os.close(new)


def _redirect_output(log_file: Path) -> None:
    """From now on stdout and stderr (of this process and whatever it starts) append to
    `log_file`, as they do for a cold runner whose starter opened the file for it."""
    sys.stdout.flush()
    sys.stderr.flush()
    new = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(new, 1)
        os.dup2(new, 2)
    finally:
        os.close(new)


if __name__ == "__main__":
    sys.exit(main())
