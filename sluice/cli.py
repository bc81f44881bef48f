"""The `sluice` command: a thin layer over `JobClient`, the dev server and the worker.

Contract used by scripts (DESIGN.md): `sluice start FILE [--job-id ID]` prints the job id and
returns once the workflow is started; `sluice stop ID --mode MODE`; `sluice wait ID --state STATE
[--timeout S]` exits 0 when reached and non-zero on Failed or timeout. Every command honours
TEMPORAL_ADDRESS / TEMPORAL_NAMESPACE (Temporal's environment configuration).

Exit codes: 0 ok; 1 the operation failed (job not found, closed, Failed, server unreachable);
2 usage error (unknown mode, bad option, invalid pipeline file); 124 `wait` timed out.
User errors print one line to stderr (`error: ...`) and no traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from datetime import UTC
from pathlib import Path
from typing import Any, NoReturn, TypeVar, get_args

import typer

from sluice import settings
from sluice.models import DEFAULT_HEALTH_WINDOW_S, TERMINAL_STATES, JobSpec, JobStateName, JobStatus
from sluice.pipeline_files import PipelineFileError
from sluice.status_view import operator_table_lines, state_line, status_lines, upgrade_line

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 124  # like timeout(1)
EXIT_INTERRUPTED = 130  # 128 + SIGINT
MAX_JOB_ID_LENGTH = 1_000  # Temporal's default limit of a workflow id

STOP_ON_INTERRUPT_MODE = "checkpoint"
# How long `sluice run` lets its worker close a run that reached a terminal state.
CLOSE_WAIT_S = 30.0
STOP_ON_INTERRUPT_TIMEOUT_S = 120.0
RUNNING_TIMEOUT_S = 300.0  # compile + schedule of a fresh job; generous for a cold machine
LIVE_REFRESH_S = 1.0
UPGRADE_POLL_S = 1.0  # how often `sluice upgrade --wait` looks at the upgrade's phase
WEB_UI_PORT = 8233
DASHBOARD_PORT = 8234  # sluice's own dashboard (`sluice ui`), beside the Temporal Web UI
LOOPBACK_IP = "127.0.0.1"
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]", ""})
JOB_STATES: tuple[str, ...] = get_args(JobStateName)



class _SluiceApp(typer.Typer):
    """Typer app whose process exit skips interpreter teardown once Temporal was used.

    The Temporal client's Rust runtime keeps native threads that may call into Python while
    the interpreter finalizes, which intermittently aborts a short-lived process with "Fatal
    Python error: PyGILState_Release" (temporalio/sdk-python#300) after the command has done
    its work. So a command that used Temporal flushes its output and leaves with os._exit; by
    then every process it started has been stopped. In-process callers (CliRunner) use the
    click command directly and are not affected.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        code: Any = 0
        try:
            super().__call__(*args, **kwargs)
        except SystemExit as exc:
            code = exc.code
        if not _TEMPORAL_USED:
            sys.exit(code)
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = EXIT_FAILED
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


_TEMPORAL_USED = False


def _mark_temporal_used() -> None:
    global _TEMPORAL_USED
    _TEMPORAL_USED = True


app = _SluiceApp(
    name="sluice",
    help="Streaming pipelines whose whole life is a durable Temporal workflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from sluice import __version__, versioning

        typer.echo(f"sluice {__version__} (build {versioning.build_id()})")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="print sluice's version and build, exit"
    ),
) -> None:
    """Streaming pipelines whose whole life is a durable Temporal workflow."""

T = TypeVar("T")


# ------------------------------------------------------------------------------ plumbing


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Print one line to stderr and exit with `code`."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _user_error_types() -> tuple[type[BaseException], ...]:
    from sluice.client import SluiceClientError
    from sluice.devserver import DevServerError
    from sluice.errors import UserError

    return (SluiceClientError, DevServerError, UserError)


def run_async(coro_fn: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., T]:
    """Run an async command body; turn user errors into one line on stderr and exit 1."""

    @functools.wraps(coro_fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        _mark_temporal_used()  # every async command talks to Temporal
        try:
            return asyncio.run(coro_fn(*args, **kwargs))
        except typer.Exit:
            raise
        except PipelineFileError as exc:
            fail(str(exc), EXIT_USAGE)
        except _user_error_types() as exc:
            fail(str(exc))
        except TimeoutError as exc:
            fail(str(exc) or "timed out", EXIT_TIMEOUT)
        except KeyboardInterrupt:
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as exc:
            from temporalio.service import RPCError

            if not isinstance(exc, RPCError):
                raise
            # The server refused what the client did not check (a limit of this server's).
            fail(f"Temporal refused the request: {exc.message or exc.status.name}")

    return wrapper


def extend_import_path(*dirs: Path) -> None:
    """Make user functions (`module:function`) importable here and in runner subprocesses.

    Prepends `dirs` to sys.path and to $PYTHONPATH (which the process scheduler's runners
    inherit). The console script does not put the cwd on sys.path the way `python -m` does, so
    callers pass it explicitly.
    """
    current = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    for d in reversed([str(Path(x).resolve()) for x in dirs]):
        if d not in sys.path:
            sys.path.insert(0, d)
        if d not in current:
            current.insert(0, d)
    os.environ["PYTHONPATH"] = os.pathsep.join(current)


def _configured_address() -> tuple[str, str]:
    """(address, namespace) from Temporal's environment configuration, with sluice's defaults."""
    from temporalio.envconfig import ClientConfig

    from sluice.client import DEFAULT_ADDRESS, DEFAULT_NAMESPACE

    try:
        cfg = ClientConfig.load_client_connect_config()
    except Exception:
        cfg = {}
    return cfg.get("target_host") or DEFAULT_ADDRESS, cfg.get("namespace") or DEFAULT_NAMESPACE


async def _job_client() -> Any:
    from sluice.client import JobClient

    return await JobClient.connect()


def _load_spec(
    file: Path,
    job_id: str | None,
    parallelism: int | None,
    checkpoint_interval: float | None,
    ignore_state: bool = False,
    from_savepoint: str | None = None,
) -> JobSpec:
    from sluice.pipeline_files import job_spec, load_pipeline

    if job_id is not None:
        _check_job_id(job_id)
    return job_spec(
        load_pipeline(file),
        job_id=job_id,
        parallelism=parallelism,
        checkpoint_interval_s=checkpoint_interval,
        ignore_state=ignore_state,
        from_savepoint=from_savepoint,
    )


def _check_job_id(job_id: str) -> None:
    """A job id is the workflow id: printable, not blank, within Temporal's length limit."""
    if not job_id.strip() or not job_id.isprintable():
        fail(f"--job-id {job_id[:60]!r}: a job id is printable text, not blank", EXIT_USAGE)
    if len(job_id) > MAX_JOB_ID_LENGTH:
        fail(f"--job-id: {len(job_id):,} characters; a job id has at most {MAX_JOB_ID_LENGTH:,}", EXIT_USAGE)


def _print_status_line(status: JobStatus) -> None:
    typer.echo(state_line(status))


def web_ui_link(job_id: str, namespace: str = "default", ui_port: int = WEB_UI_PORT) -> str:
    """The Web UI page of a job's workflow."""
    return f"http://localhost:{ui_port}/namespaces/{namespace}/workflows/{job_id}"


WORKER_STOP_TIMEOUT_S = 30.0
"""How long `sluice run` gives its worker and local host to stop cleanly before cancelling them."""
WarmRunnersOpt = typer.Option(
    2, "--warm-runners", min=0, envvar="SLUICE_WARM_RUNNERS",
    help="runner processes kept started and ready, so a job's start and recovery skip process start-up",
)
StateDirOpt = typer.Option(None, "--state-dir", help="state directory (default $SLUICE_STATE_DIR or ./.sluice)")
JobIdOpt = typer.Option(None, "--job-id", help="job id (default: the pipeline name)")
ParallelismOpt = typer.Option(None, "--parallelism", min=1, help="parallelism of every operator")
CheckpointOpt = typer.Option(
    None, "--checkpoint-interval", min=1.0, max=86_400.0, help="seconds between checkpoints (default 10)"
)


# ------------------------------------------------------------------------------ server, worker


@app.command()
def server(
    state_dir: Path = StateDirOpt,
    port: int = typer.Option(7233, "--port", help="frontend gRPC port"),
    ui_port: int = typer.Option(WEB_UI_PORT, "--ui-port", help="Web UI port"),
    ip: str = typer.Option("127.0.0.1", "--ip", help="address to bind (loopback by default)"),
    headless: bool = typer.Option(False, "--headless", help="no Web UI"),
) -> None:
    """Run the embedded Temporal dev server (SQLite under the state dir) until Ctrl-C."""
    from sluice.devserver import DevServer, DevServerError

    base = settings.state_dir(state_dir)
    srv = DevServer(base, ip=ip, port=port, ui_port=ui_port, headless=headless)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    _mark_temporal_used()  # start() probes the frontend with a Temporal client
    try:
        srv.start()
    except DevServerError as exc:
        fail(str(exc))
    typer.echo(f"Temporal dev server on {srv.address} (pid {srv.pid}), state in {base}")
    if srv.ui_url:
        typer.echo(f"Web UI: {srv.ui_url}")
    typer.echo(f"log: {srv.log_path}; Ctrl-C to stop")
    try:
        while srv.running():
            time.sleep(0.5)
        fail(f"the dev server exited unexpectedly; see {srv.log_path}")
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()


@app.command()
def worker(
    state_dir: Path = StateDirOpt,
    local_slots: int = typer.Option(
        64, "--local-slots", min=0,
        help="runner slots of the local host run beside the controller (0: control only; every "
        "runner then lives on a `sluice host`)",
    ),
    max_concurrent_activities: int = typer.Option(
        100, "--max-concurrent-activities", min=1, help="controller activities this worker runs at once"
    ),
    warm_runners: int = WarmRunnersOpt,
    build_id: str | None = typer.Option(
        None, "--build-id", help="this worker's build of deployment 'sluice' (default: sluice's version "
        "and a digest of its workflow code; env SLUICE_BUILD_ID)",
    ),
    make_current: bool = typer.Option(
        True, "--make-current/--no-make-current",
        help="route new jobs to this build when it starts (--no-make-current: deploy it first, switch later "
        "with `temporal worker deployment set-current-version`)",
    ),
    metrics_port: int | None = typer.Option(
        None, "--metrics-port", min=0,
        help="port of the metrics and logs endpoint (Temporal SDK and job-state metrics, the local host's "
        "runners); default 9465, or a free port if that is taken; 0: a free port",
    ),
) -> None:
    """Run a controller worker (JobWorkflow, the host registry, the controller activities) and,
    unless --local-slots 0, a local runner host, until Ctrl-C or SIGTERM."""
    base = settings.state_dir(state_dir)
    extend_import_path(Path.cwd())

    @run_async
    async def main() -> None:
        from sluice import versioning
        from sluice.client import connect

        client = await connect()
        where = client.service_client.config.target_host
        host = f"; local host with {local_slots} runner slots" if local_slots else "; no local host"
        build = build_id or versioning.build_id()
        typer.echo(f"controller worker on task queue 'sluice' at {where} (deployment {versioning.DEPLOYMENT_NAME}, "
                   f"build {build}){host}; state in {base}")  # fmt: skip
        from sluice.hosts.endpoint import DEFAULT_WORKER_METRICS_PORT
        from sluice.worker import create_worker

        async with create_worker(
            client, base, local_slots=local_slots, max_concurrent_activities=max_concurrent_activities,
            warm_runners=warm_runners, build=build, make_current=make_current,
            metrics_port=DEFAULT_WORKER_METRICS_PORT if metrics_port is None else metrics_port,
            metrics_port_is_default=metrics_port is None,
        ) as controller:
            if controller.endpoint is not None:
                typer.echo(f"metrics and logs at {controller.endpoint.url}")
            await _until_stopped()

    main()


def _log_to_stderr() -> None:
    """A long-running process says what it does (runners started, lost, stopped), with times."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("temporalio").setLevel(logging.WARNING)


async def _until_stopped() -> None:
    """Wait for Ctrl-C or SIGTERM, so a long-lived command leaves its `async with` normally: a
    host deregisters and stops its runners, a worker finishes its tasks (not cancelled midway)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)  # a second one interrupts the clean shutdown at once


def _parse_labels(items: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            fail(f"--label {item!r}: expected KEY=VALUE, e.g. --label zone=eu", EXIT_USAGE)
        labels[key.strip()] = value.strip()
    return labels


@app.command()
def host(
    slots: int = typer.Option(16, "--slots", min=0, help="runner processes this host runs at once"),
    host_id: str | None = typer.Option(
        None, "--host-id", help="the host's id (default: machine name and a digest of the state directory)"
    ),
    advertise: str | None = typer.Option(
        None, "--advertise", help="address runners give peers and controllers (default: the bind address)"
    ),
    bind: str = typer.Option("127.0.0.1", "--bind", help="address runners listen on (0.0.0.0: every interface)"),
    label: list[str] = typer.Option([], "--label", help="KEY=VALUE a pipeline's host_labels can require; repeatable"),
    hang_timeout: float = typer.Option(
        10.0, "--hang-timeout", min=0.5, help="seconds of silence after which a runner is reported lost (hung)"
    ),
    warm_runners: int = WarmRunnersOpt,
    metrics_port: int | None = typer.Option(
        None, "--metrics-port", min=0,
        help="port of the metrics and logs endpoint on the advertise address; default 9464, or a free "
        "port if that is taken; 0: a free port",
    ),
    state_dir: Path = StateDirOpt,
) -> None:
    """Run a runner host: offers runner slots to every job, registered in Temporal, until Ctrl-C
    or SIGTERM (then it deregisters: its jobs recover on other hosts)."""
    base = settings.state_dir(state_dir)
    extend_import_path(Path.cwd())
    labels = _parse_labels(label)
    _log_to_stderr()

    @run_async
    async def main() -> None:
        from sluice.client import connect
        from sluice.hosts.endpoint import DEFAULT_HOST_METRICS_PORT
        from sluice.hosts.host import HostConfig, RunnerHost, default_host_id

        client = await connect()
        config = HostConfig(
            host_id=host_id or default_host_id(base), slots=slots, bind=bind, advertise=advertise,
            labels=labels, hang_timeout_s=hang_timeout, warm_runners=warm_runners,
            metrics_port=DEFAULT_HOST_METRICS_PORT if metrics_port is None else metrics_port,
            metrics_port_is_default=metrics_port is None,
        )  # fmt: skip
        async with RunnerHost(client, base, config) as runner_host:
            endpoint = f"; metrics and logs at {runner_host.endpoint.url}" if runner_host.endpoint else ""
            typer.echo(
                f"host {config.host_id}: {slots} runner slots on task queue {runner_host.task_queue}, "
                f"runners at {config.address}; state in {base}{endpoint}"
            )
            await _until_stopped()

    main()


@app.command()
def hosts(
    output: str = typer.Option("table", "--output", "-o", help="table or json"),
) -> None:
    """List the runner hosts registered in Temporal: slots in use and free, labels, jobs."""
    if output not in ("table", "json"):
        fail(f"--output {output!r}: expected table or json", EXIT_USAGE)

    @run_async
    async def main() -> None:
        from datetime import datetime

        from sluice.client import connect
        from sluice.hosts.registry_client import last_heartbeats, list_hosts

        client = await connect()
        records = await list_hosts(client)
        beats = await last_heartbeats(client)
        now = datetime.now(UTC)
        if output == "json":
            import json

            typer.echo(json.dumps([
                {**r.model_dump(mode="json"), "slots_free": r.slots_free,
                 "last_heartbeat": beats[r.host_id].isoformat() if r.host_id in beats else None}
                for r in records
            ], indent=2))  # fmt: skip
            return
        if not records:
            typer.echo("no runner hosts registered (start one with `sluice host`, or `sluice worker`)")
            return
        rows = [
            (r.host_id, r.address, f"{r.slots_in_use}/{r.slots}", str(r.slots_free),
             ",".join(f"{k}={v}" for k, v in sorted(r.labels.items())) or "-", r.version or "?",
             ",".join(sorted(r.jobs)) or "-",
             f"{(now - beats[r.host_id]).total_seconds():.1f} s ago" if r.host_id in beats else "-")
            for r in records
        ]  # fmt: skip
        header = ("HOST", "ADDRESS", "IN USE", "FREE", "LABELS", "VERSION", "JOBS", "HEARTBEAT")
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
        for row in (header, *rows):
            typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())

    main()


# ------------------------------------------------------------------------------ run


class _Interrupts:
    """Counts Ctrl-C presses inside the event loop (first: stop cleanly; second: exit at once)."""

    def __init__(self) -> None:
        self.count = 0
        self.event = asyncio.Event()
        self.on_second: Callable[[], None] = lambda: None

    def __call__(self) -> None:
        self.count += 1
        self.event.set()
        if self.count >= 2:
            self.on_second()


def _status_table(status: JobStatus | None, job_id: str, note: str) -> Any:
    from rich.table import Table

    table = Table(title=f"sluice job {job_id}", caption=note, show_header=False, min_width=50)
    table.add_column("field", style="bold")
    table.add_column("value")
    if status is None:
        table.add_row("state", "?")
        return table
    table.add_row("state", status.state)
    table.add_row("generation", str(status.generation))
    table.add_row("epoch (last checkpoint)", str(status.epoch))
    table.add_row("restarts", str(status.restarts))
    table.add_row("runners", str(len(status.runners)))
    if status.parallelism:
        table.add_row("parallelism", ", ".join(f"{k}={v}" for k, v in status.parallelism.items()))
    if status.transitions:
        t = status.transitions[-1]
        table.add_row("last transition", f"{t.from_state} → {t.to_state}: {t.reason}")
    failure = status.failure or status.last_error
    if failure:
        where = f" operator {failure.operator!r}:" if failure.operator else ""
        table.add_row("failure" if status.failure else "last error", f"[{failure.domain}]{where} {failure.message}")
    return table


async def _run(
    pipeline: Path,
    job_id: str | None,
    state_dir: Path | None,
    parallelism: int | None,
    checkpoint_interval: float | None,
    ui_port: int,
    dashboard_port: int = 0,
) -> int:
    from rich.console import Console
    from rich.live import Live

    from sluice.client import JobClient, JobClosed, JobFailedError, JobNotFound, connect, server_reachable
    from sluice.devserver import DevServer

    console = Console()
    spec = _load_spec(pipeline, job_id, parallelism, checkpoint_interval)
    base = settings.state_dir(state_dir)
    # "examples.clicks:is_big" in examples/clicks.yaml: the package root is the file's dir's parent.
    extend_import_path(Path.cwd(), pipeline.resolve().parent.parent)

    address, namespace = _configured_address()
    host, _, port_s = address.rpartition(":")
    dev: DevServer | None = None
    if not await server_reachable(address, namespace):
        if host not in LOOPBACK_HOSTS or not port_s.isdigit():
            fail(f"no Temporal server answers at {address}, and sluice can only start one on this machine")
        dev = DevServer(base, port=int(port_s), ui_port=ui_port)
        console.print(f"starting the embedded Temporal server on {dev.address} (log: {dev.log_path})")
        await dev.astart()
        address = dev.address

    interrupts = _Interrupts()
    loop = asyncio.get_running_loop()

    def hard_exit() -> None:
        # Second Ctrl-C: leave at once. The job stays open in Temporal (the next `sluice run`
        # attaches to it); only our own server process is taken down with us.
        console.print("\ninterrupted again: exiting now")
        if dev is not None:
            dev.stop(timeout_s=2.0)
        os._exit(EXIT_INTERRUPTED)

    interrupts.on_second = hard_exit
    loop.add_signal_handler(signal.SIGINT, interrupts)
    loop.add_signal_handler(signal.SIGTERM, interrupts)

    worker_task: asyncio.Task[Any] | None = None
    dashboard: Any = None
    try:
        client = await connect(address, namespace)
        from sluice.hosts.endpoint import DEFAULT_WORKER_METRICS_PORT
        from sluice.worker import create_worker

        # The local host serves its job metrics, where the dashboard reads the operators' rates.
        controller = create_worker(
            client, base, metrics_port=DEFAULT_WORKER_METRICS_PORT, metrics_port_is_default=True
        )
        worker_task = asyncio.create_task(controller.run(), name="sluice-worker")
        jobs = JobClient(client)
        dashboard = await _start_dashboard(jobs, namespace, ui_port, state_dir, dashboard_port, fallback=True)
        try:
            desc = await jobs.describe(spec.job_id)
            final = await jobs.final_state(spec.job_id, desc)
        except JobNotFound:
            desc, final = None, None
        if desc is None:
            await jobs.start(spec)
            console.print(f"started job [bold]{spec.job_id}[/]")
        elif final is None:
            console.print(f"job [bold]{spec.job_id}[/] is already running: attaching")
        else:
            await jobs.resume(spec.job_id, spec=spec)
            console.print(f"job [bold]{spec.job_id}[/] was {final}: started a new run from its last checkpoint")

        wait_running = asyncio.create_task(jobs.wait_for_state(spec.job_id, ["Running"], RUNNING_TIMEOUT_S))
        interrupted = asyncio.create_task(interrupts.event.wait())
        with console.status(f"waiting for {spec.job_id} to reach Running..."):
            await asyncio.wait({wait_running, interrupted}, return_when=asyncio.FIRST_COMPLETED)
        if wait_running.done() and not interrupts.event.is_set():
            wait_running.result()  # raises JobFailedError / TimeoutError / JobClosed
            console.print(f"Web UI: {web_ui_link(spec.job_id, namespace, ui_port)}")
            console.print(f"Dashboard: {dashboard.job_url(spec.job_id)}")
            console.print("Ctrl-C stops the job with a final checkpoint (twice: exit at once)")
            with Live(_status_table(None, spec.job_id, "starting"), console=console, refresh_per_second=4) as live:
                while not interrupts.event.is_set():
                    try:
                        status = await jobs.status(spec.job_id, timeout_s=5.0)
                    except Exception as exc:  # transient: keep showing, say why
                        live.update(_status_table(None, spec.job_id, f"status unavailable: {exc}"))
                    else:
                        live.update(_status_table(status, spec.job_id, "Ctrl-C to stop"))
                        if status.state in TERMINAL_STATES:
                            break
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(interrupts.event.wait(), timeout=LIVE_REFRESH_S)
        else:
            wait_running.cancel()
        interrupted.cancel()

        if interrupts.event.is_set():
            console.print(f"stopping {spec.job_id} ({STOP_ON_INTERRUPT_MODE})...")
            with contextlib.suppress(JobClosed):
                await jobs.stop(spec.job_id, STOP_ON_INTERRUPT_MODE)
        try:
            end = await jobs.wait_for_state(spec.job_id, ["Stopped", "Finished", "Failed"], STOP_ON_INTERRUPT_TIMEOUT_S)
        except JobFailedError as exc:
            console.print(f"[red]{exc}[/]")
            await _until_closed(jobs, spec.job_id)
            return EXIT_FAILED
        except TimeoutError:
            console.print(
                f"[red]job {spec.job_id} did not stop within {STOP_ON_INTERRUPT_TIMEOUT_S:.0f} s; "
                "it stays open in Temporal and resumes with the next `sluice run`[/]"
            )
            return EXIT_FAILED
        console.print(f"job {spec.job_id} is {end.state} (last checkpoint: epoch {end.epoch})")
        await _until_closed(jobs, spec.job_id)
        if end.state == "Failed":
            return EXIT_FAILED
        return 0
    finally:
        if dashboard is not None:
            await dashboard.stop()
        if worker_task is not None:
            # A clean stop: the local host deregisters and stops its runners.
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(controller.shutdown(), timeout=WORKER_STOP_TIMEOUT_S)
            worker_task.cancel()
            with contextlib.suppress(BaseException):
                await worker_task
        if dev is not None:
            await dev.astop()
        with contextlib.suppress(Exception):
            loop.remove_signal_handler(signal.SIGINT)
            loop.remove_signal_handler(signal.SIGTERM)


async def _until_closed(jobs: Any, job_id: str) -> None:
    """The job reached a terminal state; let this process's worker close the run before it stops,
    so the next `sluice run` finds a closed job to resume rather than an open one."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(jobs.client.get_workflow_handle(job_id).result(), CLOSE_WAIT_S)


@app.command()
def run(
    pipeline: Path = typer.Argument(..., help="pipeline file (YAML or JSON)"),
    job_id: str | None = JobIdOpt,
    state_dir: Path | None = StateDirOpt,
    parallelism: int | None = ParallelismOpt,
    checkpoint_interval: float | None = CheckpointOpt,
    ui_port: int = typer.Option(WEB_UI_PORT, "--ui-port", help="Web UI port of the embedded server"),
    dashboard_port: int = typer.Option(
        DASHBOARD_PORT, "--dashboard-port", min=0, max=65535,
        help="port of the job dashboard on 127.0.0.1 (taken or 0: any free port)",
    ),
) -> None:
    """All in one: server (if none is reachable), worker and job; Ctrl-C stops it with a checkpoint."""
    code = run_async(_run)(pipeline, job_id, state_dir, parallelism, checkpoint_interval, ui_port, dashboard_port)
    raise typer.Exit(code)


# ------------------------------------------------------------------------------ dashboard


async def _start_dashboard(
    jobs: Any, namespace: str, web_ui_port: int, state_dir: Path | None, port: int,
    host: str = LOOPBACK_IP, *, fallback: bool = False,
) -> Any:
    """Serve the job dashboard (sluice/ui) in this event loop; returns its `DashboardServer`.

    A port that is taken fails with one line, or (`fallback`, for `sluice run`, where the
    dashboard is an extra) moves to any free port.
    """
    from sluice.ui.server import DashboardServer
    from sluice.ui.views import Dashboard

    web_ui = functools.partial(web_ui_link, namespace=namespace, ui_port=web_ui_port)
    dashboard = Dashboard(jobs, web_ui=web_ui, state_dir=state_dir)
    server = DashboardServer(dashboard, host, port)
    try:
        await server.start()
    except OSError as exc:
        if not fallback or port == 0:
            fail(f"cannot serve the dashboard on {host}:{port}: {exc.strerror or exc}")
        server = DashboardServer(dashboard, host, 0)
        await server.start()
    return server


@app.command()
def ui(
    port: int = typer.Option(DASHBOARD_PORT, "--port", min=0, max=65535, help="port to serve on (0: any free one)"),
    host: str = typer.Option(
        LOOPBACK_IP, "--host", help="address to bind; the dashboard has no authentication, keep it on loopback"
    ),
    state_dir: Path | None = StateDirOpt,
    web_ui_port: int = typer.Option(WEB_UI_PORT, "--web-ui-port", help="port of the Temporal Web UI the pages link to"),
) -> None:
    """The live job dashboard for a browser (http://127.0.0.1:8234/) until Ctrl-C; see docs/dashboard.md."""

    @run_async
    async def main() -> None:
        _, namespace = _configured_address()
        server = await _start_dashboard(await _job_client(), namespace, web_ui_port, state_dir, port, host)
        typer.echo(f"dashboard: {server.url} (Ctrl-C stops it)")
        sys.stdout.flush()  # a pipe (a script waiting for the line) gets it now
        try:
            await _until_stopped()
        finally:
            await server.stop()

    main()


# ------------------------------------------------------------------------------ job commands


@app.command()
def start(
    file: Path = typer.Argument(..., help="pipeline file (YAML or JSON)"),
    job_id: str | None = JobIdOpt,
    parallelism: int | None = ParallelismOpt,
    checkpoint_interval: float | None = CheckpointOpt,
    ignore_state: bool = typer.Option(False, "--ignore-state", help="don't restore an earlier run's checkpoint"),
    from_savepoint: str | None = typer.Option(
        None, "--from-savepoint", metavar="JOB/NAME", help="start from savepoint NAME of job JOB (same store)"
    ),
    wait: bool = typer.Option(
        False, "--wait", help="return once the job is Running (exit 1 with its failure if it fails first)"
    ),
    timeout: float = typer.Option(RUNNING_TIMEOUT_S, "--timeout", min=1.0, help="seconds --wait waits at most"),
) -> None:
    """Start a job; prints its id once the workflow is started (with --wait: once it runs)."""
    if from_savepoint is not None and ignore_state:
        fail("--from-savepoint and --ignore-state cannot be combined", EXIT_USAGE)
    spec = _wrap_user_errors(
        lambda: _load_spec(file, job_id, parallelism, checkpoint_interval, ignore_state, from_savepoint)
    )

    @run_async
    async def main() -> str:
        jobs = await _job_client()
        started = str(await jobs.start(spec))
        if wait:
            # A job that fails while compiling or scheduling raises JobFailedError: exit 1, its failure.
            st = await jobs.wait_for_state(started, ["Running", "Finished"], timeout_s=timeout)
            return f"{started}\n{state_line(st)}"
        return started

    typer.echo(main())


def _wrap_user_errors(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except PipelineFileError as exc:
        fail(str(exc), EXIT_USAGE)
    except _user_error_types() as exc:
        fail(str(exc))


@app.command()
def validate(
    file: Path = typer.Argument(..., help="pipeline file (YAML or JSON)"),
    parallelism: int | None = ParallelismOpt,
) -> None:
    """Check a pipeline file as a start would (parse, then the full compile: operators, edges,
    keys, schemas, user functions' import paths); starts nothing. Exit 0 if valid, 2 if not."""
    from sluice.engine.compiler import compile_program, runners_needed
    from sluice.errors import UserError

    extend_import_path(file.resolve().parent, Path.cwd())
    spec = _wrap_user_errors(lambda: _load_spec(file, None, parallelism, None))
    try:
        program = compile_program(spec.pipeline, spec.config)
    except UserError as exc:
        fail(f"{file}: {exc}", EXIT_USAGE)
    subtasks = sum(program.parallelism.values())
    runners = runners_needed(program, spec.config.slots_per_runner)
    plural = "s" if runners != 1 else ""
    typer.echo(f"{file}: valid: pipeline {program.name!r}, {len(program.operators)} operators, "
               f"{len(program.chains)} chains, {subtasks} subtasks on {runners} runner{plural}")  # fmt: skip


@app.command()
def stop(
    job_id: str = typer.Argument(...),
    mode: str = typer.Option("checkpoint", "--mode", help="none | checkpoint | graceful | immediate | force"),
) -> None:
    """Ask a job to stop (returns once the command is accepted; see `wait`)."""
    from sluice.client import STOP_MODES

    if mode not in STOP_MODES:
        fail(f"unknown stop mode {mode!r}; expected one of: {', '.join(STOP_MODES)}", EXIT_USAGE)

    @run_async
    async def main() -> None:
        status = await (await _job_client()).stop(job_id, mode)
        if status is None:
            typer.echo(f"{job_id}: started a new run from its last checkpoint")
        else:
            typer.echo(f"{job_id}: stop ({mode}) accepted; state {status.state}")

    main()


def _parse_overrides(items: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        op, sep, n = item.partition("=")
        if not sep or not op or not n.isdigit() or int(n) < 1:
            fail(f"--override {item!r}: expected OPERATOR=N with N >= 1", EXIT_USAGE)
        out[op] = int(n)
    return out


@app.command()
def rescale(
    job_id: str = typer.Argument(...),
    parallelism: int | None = typer.Option(None, "--parallelism", min=1, help="new default parallelism"),
    override: list[str] = typer.Option([], "--override", help="OPERATOR=N (repeatable)"),
) -> None:
    """Change a running job's parallelism (checkpoint, then reschedule)."""
    overrides = _parse_overrides(override)
    if parallelism is None and not overrides:
        fail("rescale needs --parallelism N or --override OPERATOR=N", EXIT_USAGE)

    @run_async
    async def main() -> None:
        status = await (await _job_client()).rescale(job_id, parallelism=parallelism, overrides=overrides or None)
        typer.echo(f"{job_id}: rescale accepted; state {status.state if status else '?'}")

    main()


@app.command()
def restart(
    job_id: str = typer.Argument(...),
    force: bool = typer.Option(False, "--force", help="don't take a final checkpoint first"),
    ignore_state: bool = typer.Option(False, "--ignore-state", help="start from scratch, not the last checkpoint"),
    restore_epoch: int | None = typer.Option(
        None, "--restore-epoch", min=1,
        help="Stopped/Failed job: restore this older checkpoint (see `sluice checkpoints`); later ones are "
        "abandoned and output committed after it is written again",
    ),
) -> None:
    """Restart a job (a Stopped or Failed one gets a new run restoring its last checkpoint)."""
    if restore_epoch is not None and (force or ignore_state):
        fail("--restore-epoch cannot be combined with --force or --ignore-state", EXIT_USAGE)

    @run_async
    async def main() -> None:
        jobs = await _job_client()
        status = await jobs.restart(job_id, force=force, ignore_state=ignore_state, restore_epoch=restore_epoch)
        if status is None:
            source = (
                f" from checkpoint epoch {restore_epoch}" if restore_epoch is not None
                else "" if ignore_state else " from its last checkpoint"
            )
            typer.echo(f"{job_id}: started a new run{source}")
        else:
            typer.echo(f"{job_id}: restart accepted; state {status.state}")

    main()


def _store_url(job_id: str, state_dir: Path | None, checkpoint_url: str | None) -> str:
    """The job's checkpoint store: the given URL, else the job's own (from its spec), else the default."""
    if checkpoint_url is not None:
        return checkpoint_url

    @run_async
    async def main() -> str:
        jobs = await _job_client()
        desc = await jobs.describe(job_id)
        spec = (await jobs._job_input(job_id, desc.run_id)).spec
        return spec.checkpoint_url or settings.default_checkpoint_url(settings.state_dir(state_dir))

    return main()


def _read_store(job_id: str, url: str, what: str, read: Callable[[Any], T]) -> T:
    """`read(the job's CheckpointStore)`; a store that cannot be read is one line naming it."""
    from sluice.storage import CheckpointStore

    try:
        return read(CheckpointStore(url, job_id))
    except Exception as exc:  # the store itself is unreachable or unreadable: say which one
        fail(f"cannot read the {what} of job {job_id} in {url}: {type(exc).__name__}: {exc}")


CheckpointUrlOpt = typer.Option(
    None, "--checkpoint-url", help="the job's checkpoint store (default: the job's own, from its spec)"
)


def _human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


@app.command()
def checkpoints(
    job_id: str = typer.Argument(...),
    as_json: bool = typer.Option(False, "--json", help="print as JSON"),
    state_dir: Path | None = StateDirOpt,
    checkpoint_url: str | None = CheckpointUrlOpt,
) -> None:
    """List a job's completed checkpoints: epoch, time, size, and whether each verifies."""
    from sluice.storage import report_checkpoints

    url = _store_url(job_id, state_dir, checkpoint_url)
    reports = _read_store(job_id, url, "checkpoints", report_checkpoints)
    if as_json:
        import json

        body = {"job_id": job_id, "checkpoint_url": url, "checkpoints": [r.as_dict() for r in reports]}
        typer.echo(json.dumps(body, indent=2))
        return
    if not reports:
        typer.echo(f"no checkpoints of job {job_id} in {url}")
        return
    typer.echo(f"checkpoints of job {job_id} in {url}")
    typer.echo(f"{'epoch':>10}  {'created (UTC)':<19}  {'size':>10}  verified")
    for r in reports:
        created = r.created_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if r.created_at else "?"
        verdict = "ok" + (" (final, then stop)" if r.then_stop else "") if r.ok else f"CORRUPT: {r.problems[0]}"
        if len(r.problems) > 1:
            verdict += f" (and {len(r.problems) - 1} more)"
        typer.echo(f"{r.epoch:>10}  {created:<19}  {_human_size(r.size):>10}  {verdict}")


@app.command()
def logs(
    job_id: str = typer.Argument(...),
    generation: int | None = typer.Option(None, "--generation", "-g", min=1, help="default: the current one"),
    runner: int | None = typer.Option(None, "--runner", "-r", min=0, help="only runner R (runner-R.log)"),
    lines: int = typer.Option(100, "--lines", "-n", min=0, help="the last N lines of each log"),
    follow: bool = typer.Option(False, "--follow", "-f", help="keep printing what the runners write"),
    state_dir: Path | None = StateDirOpt,
) -> None:
    """Print the logs of a job's runners, from every host (through the hosts' endpoints, each line
    prefixed with its runner id); where no endpoint has them, from this machine's runner files."""

    @run_async
    async def remote() -> bool:
        from sluice.client import SluiceClientError, connect
        from sluice.observe import NoRemoteLogs, job_logs

        try:
            client = await connect()
            async for line in job_logs(
                client, job_id, generation=generation, runner=runner, tail=lines, follow=follow
            ):
                typer.echo(line)
        except (NoRemoteLogs, SluiceClientError):
            return False
        return True

    if not remote():
        _local_logs(job_id, generation, runner, lines, follow, settings.state_dir(state_dir))


def _local_logs(job_id: str, generation: int | None, runner: int | None, lines: int, follow: bool,
                state_dir: Path) -> None:  # fmt: skip
    """`sluice logs` from this machine's runner files (no host endpoint has the job's logs)."""
    from sluice.hosts.runner_logs import LOG_FOLLOW_S, LogReader, LogsNotFound, pick_generation

    try:
        gen = pick_generation(state_dir, job_id, generation)
    except LogsNotFound as e:
        fail(str(e))
    reader = LogReader(state_dir, job_id, gen, runner)
    for line in reader.tail(lines):
        typer.echo(line)
    try:
        while follow:
            time.sleep(LOG_FOLLOW_S)
            for line in reader.new_lines():
                typer.echo(line)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None


@app.command()
def history(
    job_id: str = typer.Argument(...),
    output: str = typer.Option("table", "--output", "-o", help="table | json (a list of transitions)"),
) -> None:
    """The job's state transitions with their times and reasons (the newest 50)."""
    if output not in ("table", "json"):
        fail(f"unknown output {output!r}; expected table or json", EXIT_USAGE)

    @run_async
    async def main() -> Any:
        return await (await _job_client()).status(job_id)

    st = main()
    if output == "json":
        import json

        typer.echo(json.dumps([t.model_dump(mode="json") for t in st.transitions], indent=2))
        return
    typer.echo(f"{'time (UTC)':<23}  {'from':<18}  {'to':<18}  reason")
    for t in st.transitions:
        when = t.time.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        typer.echo(f"{when:<23}  {t.from_state:<18}  {t.to_state:<18}  {t.reason}")


@app.command()
def delete(
    job_id: str = typer.Argument(...),
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask for confirmation"),
    state_dir: Path | None = StateDirOpt,
    checkpoint_url: str | None = CheckpointUrlOpt,
) -> None:
    """Delete a closed job's checkpoints, savepoints and runner files (its sink output stays)."""
    from sluice.savepoints import list_savepoints
    from sluice.schedulers.process import job_dir_name
    from sluice.storage import CheckpointStore

    @run_async
    async def final() -> str | None:
        return await (await _job_client()).final_state(job_id)

    closed = final()
    if closed is None:
        fail(f"job {job_id} is open; stop it first (sluice stop {job_id})")
    url = _store_url(job_id, state_dir, checkpoint_url)
    store = CheckpointStore(url, job_id)
    epochs = _read_store(job_id, url, "checkpoints", lambda st: st.completed_epochs())
    saved = _read_store(job_id, url, "savepoints", list_savepoints)
    runner_files = settings.runners_dir(settings.state_dir(state_dir)) / job_dir_name(job_id)
    what = f"{len(epochs)} checkpoints and {len(saved)} savepoints in {store.job_root}"
    if not yes:
        if not sys.stdin.isatty():
            fail(f"deleting job {job_id} ({closed}) removes {what}: confirm with --yes", EXIT_USAGE)
        typer.confirm(f"delete job {job_id} ({closed}): {what}, and its runner files?", abort=True)
    try:
        store.fs.delete_dir(store.job_root)
    except FileNotFoundError:
        pass
    shutil.rmtree(runner_files, ignore_errors=True)
    typer.echo(f"deleted job {job_id} ({closed}): {what}; runner files {runner_files}")


@app.command()
def savepoint(
    job_id: str = typer.Argument(...),
    name: str | None = typer.Option(None, "--name", help="the savepoint's name (default savepoint-<epoch>)"),
    dispose: str | None = typer.Option(None, "--dispose", metavar="NAME", help="dispose of savepoint NAME instead"),
    state_dir: Path | None = StateDirOpt,
    checkpoint_url: str | None = CheckpointUrlOpt,
) -> None:
    """Take a savepoint of a Running job: a checkpoint kept until disposed (retention never deletes
    it), to restart this job or start another from (`sluice start FILE --from-savepoint JOB/NAME`)."""
    from pydantic import ValidationError

    from sluice.models import SavepointRequest

    if name is not None and dispose is not None:
        fail("--name and --dispose cannot be combined", EXIT_USAGE)
    for given in (name, dispose):
        if given is not None:
            try:
                SavepointRequest(name=given)
            except ValidationError:
                fail(f"savepoint name {given!r}: use letters, digits, '.', '_' and '-' (at most 64, "
                     "starting with a letter or digit)", EXIT_USAGE)  # fmt: skip
    if dispose is not None:
        _dispose_savepoint(job_id, dispose, state_dir, checkpoint_url)
        return

    @run_async
    async def main() -> Any:
        return await (await _job_client()).savepoint(job_id, name)

    info = main()
    typer.echo(f"savepoint {info.name} of job {job_id}: epoch {info.epoch}, {_human_size(info.size_bytes)}")


def _dispose_savepoint(job_id: str, name: str, state_dir: Path | None, checkpoint_url: str | None) -> None:
    from sluice.savepoints import SavepointError, dispose_savepoint
    from sluice.storage import CheckpointStore

    url = _store_url(job_id, state_dir, checkpoint_url)

    @run_async
    async def keep() -> set[int]:
        # The job's restore point and the checkpoints retention keeps stay; the rest of the epoch goes.
        st = await (await _job_client()).status(job_id)
        store = CheckpointStore(url, job_id)
        return {st.epoch, *store.completed_epochs()[-st.config.checkpoints_to_keep :]}

    try:
        info = dispose_savepoint(CheckpointStore(url, job_id), name, keep_epochs=keep())
    except SavepointError as exc:
        fail(str(exc))
    typer.echo(f"disposed of savepoint {info.name} of job {job_id} (epoch {info.epoch})")


@app.command()
def upgrade(
    job_id: str = typer.Argument(...),
    file: Path = typer.Argument(..., help="the new pipeline file (YAML or JSON)"),
    mode: str = typer.Option(
        "savepoint", "--mode", help="savepoint (default) | last-state | stateless: where its state comes from"
    ),
    allow_drop_state: list[str] = typer.Option(
        [], "--allow-drop-state", metavar="OP", help="let operator OP start with empty state (repeatable)"
    ),
    require_approval: bool = typer.Option(
        False, "--require-approval", help="wait for `sluice approve JOB` (or reject) before switching"
    ),
    health_window: float = typer.Option(
        DEFAULT_HEALTH_WINDOW_S, "--health-window", min=0.0,
        help="seconds the new generation must run without failing (and checkpoint) before the upgrade counts",
    ),
    wait: bool = typer.Option(False, "--wait", help="also wait for the health window's end: completed or rolled back"),
) -> None:
    """Upgrade a Running job to a new pipeline, keeping its state: a compatibility check, a
    savepoint, the new generation, a health window, and an automatic rollback if it fails.
    Returns once the new generation runs (or the upgrade was refused, exit 1)."""
    from pydantic import ValidationError

    from sluice.models import UpgradeRequest

    spec = _wrap_user_errors(lambda: _load_spec(file, job_id, None, None))
    try:
        request = UpgradeRequest(
            pipeline=spec.pipeline, mode=mode, allow_drop_state=allow_drop_state,
            require_approval=require_approval, health_window_s=health_window,
        )  # fmt: skip
    except ValidationError:
        fail(f"--mode {mode!r}: use savepoint, last-state or stateless", EXIT_USAGE)

    @run_async
    async def main() -> str:
        jobs = await _job_client()
        up = await jobs.upgrade(job_id, request)
        if up.phase == "awaiting_approval":
            return (f"upgrade {up.number} of job {job_id} is compatible and waits for approval: "
                    f"sluice approve {job_id} (or sluice reject {job_id})")  # fmt: skip
        if wait:
            up = await _wait_upgrade_settled(jobs, job_id, up.number)
        return upgrade_line(job_id, up)

    typer.echo(main())


async def _wait_upgrade_settled(jobs: Any, job_id: str, number: int) -> Any:
    """Poll the job's status until upgrade `number` left its health window (or the job closed)."""
    import asyncio

    while True:
        status = await jobs.status(job_id)
        up = status.upgrade
        if up is None or up.number != number or not up.active or status.state in TERMINAL_STATES:
            return up
        await asyncio.sleep(UPGRADE_POLL_S)


@app.command()
def approve(job_id: str = typer.Argument(...)) -> None:
    """Approve the upgrade waiting for approval; returns once its new generation runs."""

    @run_async
    async def main() -> str:
        return upgrade_line(job_id, await (await _job_client()).decide_upgrade(job_id, True))

    typer.echo(main())


@app.command()
def reject(
    job_id: str = typer.Argument(...),
    reason: str | None = typer.Option(None, "--reason", help="why (shown in the job's status)"),
) -> None:
    """Reject the upgrade waiting for approval: the job runs on with its pipeline."""

    @run_async
    async def main() -> str:
        return upgrade_line(job_id, await (await _job_client()).decide_upgrade(job_id, False, reason))

    typer.echo(main())


@app.command()
def savepoints(
    job_id: str = typer.Argument(...),
    as_json: bool = typer.Option(False, "--json", help="print as JSON"),
    state_dir: Path | None = StateDirOpt,
    checkpoint_url: str | None = CheckpointUrlOpt,
) -> None:
    """List a job's savepoints: name, epoch, time, size and pipeline version."""
    from sluice.savepoints import list_savepoints

    url = _store_url(job_id, state_dir, checkpoint_url)
    found = _read_store(job_id, url, "savepoints", list_savepoints)
    if as_json:
        import json

        typer.echo(json.dumps([i.model_dump(mode="json") for i in found], indent=2))
        return
    if not found:
        typer.echo(f"no savepoints of job {job_id} in {url}")
        return
    typer.echo(f"{'name':<24}  {'epoch':>8}  {'created (UTC)':<19}  {'size':>10}  pipeline (version)")
    for i in found:
        created = i.created_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
        typer.echo(f"{i.name:<24}  {i.epoch:>8}  {created:<19}  {_human_size(i.size_bytes):>10}  "
                   f"{i.pipeline_name} ({i.pipeline_version})")  # fmt: skip


@app.command()
def status(
    job_id: str = typer.Argument(...),
    as_json: bool = typer.Option(False, "--json", help="print the full status query as JSON"),
) -> None:
    """Show a job's status (the workflow's `status` query); for a Running job also its operators'
    records in and out per second, watermark lag and backpressure (from the hosts' endpoints)."""

    @run_async
    async def main() -> None:
        jobs = await _job_client()
        st = await jobs.status(job_id)
        if as_json:
            typer.echo(st.model_dump_json(indent=2))
            return
        for line in status_lines(st):
            typer.echo(line)
        if st.state == "Running":
            from sluice.observe import job_metrics

            try:
                metrics = await job_metrics(jobs, job_id)
            except Exception as e:  # noqa: BLE001 - the status itself was shown; say why no table
                typer.echo(f"operators: metrics unavailable: {e}")
                return
            for line in operator_table_lines(metrics):
                typer.echo(line)

    main()


@app.command("list")
def list_jobs(
    state: str | None = typer.Option(None, "--state", help="only jobs in this state"),
    output: str = typer.Option("table", "--output", "-o", help="table | json (a list of {job_id, state, pipeline})"),
) -> None:
    """List jobs (latest run of each), optionally by state."""
    if state is not None and state not in JOB_STATES:
        fail(f"unknown state {state!r}; expected one of: {', '.join(JOB_STATES)}", EXIT_USAGE)
    if output not in ("table", "json"):
        fail(f"unknown output {output!r}; expected table or json", EXIT_USAGE)

    @run_async
    async def main() -> None:
        rows = await (await _job_client()).list(state)
        if output == "json":
            import json

            body = [{"job_id": r.job_id, "state": r.state, "pipeline": r.pipeline_name} for r in rows]
            typer.echo(json.dumps(body, indent=2))
            return
        if not rows:
            typer.echo("no jobs")
            return
        width = max(len("JOB"), *(len(r.job_id) for r in rows))
        typer.echo(f"{'JOB':<{width}}  {'STATE':<18}  PIPELINE")
        for r in rows:
            typer.echo(f"{r.job_id:<{width}}  {r.state:<18}  {r.pipeline_name}")

    main()


@app.command()
def wait(
    job_id: str = typer.Argument(...),
    state: list[str] = typer.Option(..., "--state", help="state to wait for (repeatable)"),
    timeout: float | None = typer.Option(None, "--timeout", min=0.0, help="seconds; exit 124 after"),
) -> None:
    """Wait until the job is in one of the states: exit 0; 1 if it fails or ends elsewhere; 124 on timeout."""
    unknown = [s for s in state if s not in JOB_STATES]
    if unknown:
        fail(f"unknown state {unknown[0]!r}; expected one of: {', '.join(JOB_STATES)}", EXIT_USAGE)

    @run_async
    async def main() -> None:
        st = await (await _job_client()).wait_for_state(job_id, state, timeout)
        _print_status_line(st)

    main()


if __name__ == "__main__":
    app()
