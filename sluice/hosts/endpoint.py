"""The observability endpoint of a runner host or controller worker: one stable HTTP port per process.

Routes (docs/metrics.md describes every metric and the JSON):

- `GET /metrics`: Prometheus text of everything the process knows: for a host, every runner on it
  (scraped from the runners' own `/metrics` and merged, labelled job, generation, runner,
  operator, subtask) and the host's gauges; for a controller worker, the Temporal SDK's metrics
  and sluice's controller gauges; for `sluice worker`, both.
- `GET /jobs/{job_id}/metrics` (hosts only): the job's per-operator JSON on this host
  (sluice.hosts.job_metrics.JobMetrics).
- `GET /jobs/{job_id}/logs?generation=N&runner=R&tail=N&follow=1` (hosts only): the job's runner
  log lines on this host, each prefixed with its runner id; `follow=1` streams new lines until the
  client goes away.

Bad query parameters get a 400 with a one-line JSON error naming the parameter; a job without
logs here a 404. The endpoint is read-only and unauthenticated, like the runners' `/metrics`:
bind it to an address only trusted scrapers reach.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from sluice.hosts.job_metrics import JobMetrics
from sluice.hosts.runner_logs import DEFAULT_TAIL_LINES, LOG_FOLLOW_S, LogReader, LogsNotFound, pick_generation

log = logging.getLogger("sluice.hosts.endpoint")

DEFAULT_HOST_METRICS_PORT = 9464
"""`sluice host --metrics-port` default (Prometheus' registered default port of exporters)."""
DEFAULT_WORKER_METRICS_PORT = 9465
"""`sluice worker --metrics-port` default: next to a host's, so both run on one machine."""
HTTP_SHUTDOWN_TIMEOUT_S = 2.0
"""How long in-flight requests (a followed log, a scrape) get when the endpoint closes."""
LISTEN_BACKLOG = 128
"""Pending connections the endpoint queues: scrapers and log followers are few."""
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

MetricsSource = Callable[[], Awaitable[str]]
"""Something that contributes Prometheus text to `GET /metrics`."""


class HostView(Protocol):
    """What the endpoint needs of a runner host (sluice.hosts.host_metrics.HostObserver)."""

    state_dir: Path

    def job_metrics(self, job_id: str) -> JobMetrics: ...


def merge_expositions(texts: Iterable[str]) -> bytes:
    """Several Prometheus text expositions as one: families of the same name (the same metric of
    several runners) become one family with every sample, as the format requires."""
    families: dict[str, Metric] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            known = families.get(family.name)
            if known is None:
                families[family.name] = family
            else:
                known.samples.extend(family.samples)

    class _Merged:
        def collect(self) -> Iterable[Metric]:
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry)


def _bad(message: str, status: int = 400) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _int_param(request: web.Request, name: str, minimum: int) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(reason=f"{name}: not an integer: {raw!r}") from None
    if value < minimum:
        raise web.HTTPBadRequest(reason=f"{name}: must be >= {minimum}, got {value}")
    return value


def _bool_param(request: web.Request, name: str) -> bool:
    raw = request.query.get(name, "0").lower()
    if raw in ("1", "true", "yes"):
        return True
    if raw in ("0", "false", "no", ""):
        return False
    raise web.HTTPBadRequest(reason=f"{name}: expected 1 or 0, got {raw!r}")


class ObservabilityEndpoint:
    """The HTTP server (see the module docstring). `start()` binds it, `close()` ends it."""

    def __init__(
        self, bind: str, port: int, *, advertise: str | None = None, port_is_default: bool = False
    ) -> None:
        self.bind = bind
        self.port = port
        self.advertise = advertise or bind
        self.port_is_default = port_is_default  # a default port in use falls back to a free one
        self.sources: list[MetricsSource] = []
        self.host: HostView | None = None
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()

    @property
    def url(self) -> str:
        """Where clients reach it (after `start()`)."""
        host = f"[{self.advertise}]" if ":" in self.advertise else self.advertise
        return f"http://{host}:{self.port}"

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors])
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/jobs/{job_id}/metrics", self._job_metrics)
        app.router.add_get("/jobs/{job_id}/logs", self._job_logs)
        return app

    async def start(self) -> str:
        """Bind and serve; returns the URL. A port in use is an OSError naming it, unless the port
        was only the default (then a free one is taken, with a warning)."""
        try:
            sock = _bind(self.bind, self.port)
        except OSError as e:
            if not (self.port_is_default and e.errno == errno.EADDRINUSE):
                raise OSError(e.errno, f"metrics port {self.bind}:{self.port}: {e.strerror}") from None
            log.warning("default metrics port %d is in use: serving on a free port instead", self.port)
            sock = _bind(self.bind, 0)
        self.port = sock.getsockname()[1]
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=HTTP_SHUTDOWN_TIMEOUT_S)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        log.info("metrics and logs endpoint at %s", self.url)
        return self.url

    async def close(self) -> None:
        self._closing.set()  # followed logs end
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status >= 400:
                return _bad(e.reason, e.status)
            raise
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug in a handler answers 500, and the endpoint stays up
            log.exception("serving %s failed", request.path)
            return _bad(f"internal error: {type(e).__name__}: {e}", 500)

    async def _metrics(self, request: web.Request) -> web.Response:
        texts = await asyncio.gather(*(source() for source in self.sources), return_exceptions=True)
        ok: list[str] = []
        for text in texts:
            if isinstance(text, BaseException):
                log.warning("a metrics source failed: %s", text)
            else:
                ok.append(text)
        return web.Response(body=merge_expositions(ok), headers={"Content-Type": PROMETHEUS_CONTENT_TYPE})

    def _host(self) -> HostView:
        if self.host is None:
            raise web.HTTPNotFound(reason="this endpoint has no runner host (a worker with --local-slots 0)")
        return self.host

    async def _job_metrics(self, request: web.Request) -> web.Response:
        metrics = self._host().job_metrics(request.match_info["job_id"])
        return web.json_response(text=metrics.model_dump_json())

    async def _job_logs(self, request: web.Request) -> web.StreamResponse:
        host = self._host()
        job_id = request.match_info["job_id"]
        generation = _int_param(request, "generation", 1)
        runner = _int_param(request, "runner", 0)
        tail = _int_param(request, "tail", 0)
        follow = _bool_param(request, "follow")
        try:
            gen = pick_generation(host.state_dir, job_id, generation)
        except LogsNotFound as e:
            raise web.HTTPNotFound(reason=str(e)) from None
        reader = LogReader(host.state_dir, job_id, gen, runner)
        lines = await asyncio.to_thread(reader.tail, DEFAULT_TAIL_LINES if tail is None else tail)
        if not follow:
            return web.Response(text="".join(f"{line}\n" for line in lines), content_type="text/plain")
        resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await resp.prepare(request)
        try:
            while True:
                if lines:
                    await resp.write("".join(f"{line}\n" for line in lines).encode())
                try:
                    await asyncio.wait_for(self._closing.wait(), LOG_FOLLOW_S)
                    break
                except TimeoutError:
                    pass
                lines = await asyncio.to_thread(reader.new_lines)
        except ConnectionError:
            pass  # the reader went away
        return resp


def _bind(address: str, port: int) -> socket.socket:
    family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        # Listen here, not later in the server: with SO_REUSEADDR two processes starting together
        # can both bind one port, and only listen() then tells the second that it is taken.
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock
