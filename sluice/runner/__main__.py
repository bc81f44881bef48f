"""Entry point of a runner process: `python -m sluice.runner --job-id J --generation G ...`.

The bearer token comes from $SLUICE_RUNNER_TOKEN only (never the command line, which any local
user can read); it is removed from the environment right away so user functions and any process
they spawn do not inherit it. Exits 0 on SIGTERM/SIGINT, POST /shutdown or the orphan timeout,
2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from sluice.auth import TOKEN_ENV
from sluice.runner.server import DEFAULT_ORPHAN_TIMEOUT_S, RunnerServer

log = logging.getLogger("sluice.runner")


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    token = os.environ.pop(TOKEN_ENV, "")
    if not token:
        print(f"sluice.runner: ${TOKEN_ENV} is not set", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=os.environ.get("SLUICE_LOG_LEVEL", "INFO").upper(),
        format=f"%(asctime)s %(levelname)s [{args.runner_id} g{args.generation}] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return asyncio.run(amain(args, token))


if __name__ == "__main__":
    sys.exit(main())
