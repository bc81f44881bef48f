"""The dashboard's HTTP server: the static page (sluice/ui/static) and its JSON API.

Routes (docs/dashboard.md):
    GET  /                              the job list page
    GET  /jobs/{job_id}                 a job's page
    GET  /static/...                    the page's CSS and JavaScript
    GET  /api/jobs                      {"jobs": [{job_id, state, pipeline_name}]}
    GET  /api/jobs/{job_id}             status, graph, Web UI link (see `Dashboard.job`)
    GET  /api/jobs/{job_id}/metrics     per-operator counts and rates (`sluice.observe`)
    GET  /api/jobs/{job_id}/checkpoints the store's checkpoints with durations
    POST /api/jobs/{job_id}/stop        {"mode": "checkpoint"|"graceful"|"immediate"|"force"}
    POST /api/jobs/{job_id}/rescale     {"parallelism": N} and/or {"overrides": {"op": N}}
    POST /api/jobs/{job_id}/restart     {"force": bool, "ignore_state": bool}

A refused action answers with an HTTP error status and `{"error": <the client's message>}`.
There is no authentication: the server binds loopback by default, answers only requests whose
Host header names this machine (no DNS rebinding), and takes actions only as JSON (`Content-Type:
application/json`, which another site's page cannot send without a CORS preflight this server
never grants) from its own origin.
"""

from __future__ import annotations

import html
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import web
from pydantic import ValidationError
from temporalio.service import RPCError

from sluice.client import (
    CommandRejected,
    JobAlreadyRunning,
    JobClosed,
    JobNotFound,
    ServerUnavailable,
    SluiceClientError,
)
from sluice.ui.views import Dashboard

DEFAULT_HOST = "127.0.0.1"
STATIC_DIR = Path(__file__).resolve().parent / "static"
JOB_PAGE_SLOT = "{{JOB_ID}}"  # where job.html takes the (escaped) job id
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
MAX_BODY_BYTES = 64 * 1024  # an action's JSON is a few bytes
# The page loads its own scripts and styles only; nothing inline, nothing from elsewhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _one_line(exc: ValidationError) -> str:
    """A pydantic error as one line: where, and what is wrong."""
    first = exc.errors()[0]
    where = ".".join(str(x) for x in first.get("loc", ()))
    return f"{where + ': ' if where else ''}{first['msg']}"


def _hostname(host_header: str) -> str:
    """The name in a Host header, without its port ("[::1]:8234" -> "::1")."""
    if host_header.startswith("["):
        return host_header[1:].split("]", 1)[0]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def _error_response(exc: Exception) -> web.Response | None:
    """The HTTP answer to a refused read or action, carrying the client's message; None when
    `exc` is not one a user can act on (a bug: aiohttp answers 500)."""
    if isinstance(exc, JobNotFound):
        return _error(404, str(exc))
    if isinstance(exc, JobClosed | CommandRejected | JobAlreadyRunning):
        return _error(409, str(exc))
    if isinstance(exc, ServerUnavailable):
        return _error(503, str(exc))
    if isinstance(exc, SluiceClientError):
        return _error(502, str(exc))
    if isinstance(exc, ValidationError):
        return _error(400, _one_line(exc))
    if isinstance(exc, ValueError):
        return _error(400, str(exc))
    if isinstance(exc, TimeoutError):
        return _error(504, str(exc) or "timed out")
    if isinstance(exc, RPCError):
        return _error(502, f"Temporal refused the request: {exc.message or exc.status.name}")
    return None


def create_app(dashboard: Dashboard, *, bind_host: str = DEFAULT_HOST) -> web.Application:
    """The aiohttp application serving `dashboard`; `bind_host` decides which Host headers pass
    (on a loopback address: only this machine's names)."""
    loopback_only = bind_host in LOOPBACK_NAMES

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if loopback_only and _hostname(request.host) not in LOOPBACK_NAMES | {bind_host}:
            return _error(403, f"host {request.host!r} is not this machine; open the dashboard at its loopback address")
        if request.method == "POST":
            if request.content_type != "application/json":
                return _error(415, "actions take a JSON body (Content-Type: application/json)")
            origin = request.headers.get("Origin")
            if origin is not None and origin.split("://", 1)[-1] != request.host:
                return _error(403, f"cross-origin action from {origin!r} refused")
        try:
            response = await handler(request)
        except web.HTTPException:
            raise
        except Exception as exc:
            answer = _error_response(exc)
            if answer is None:
                raise
            response = answer
        response.headers.update(SECURITY_HEADERS)
        return response

    app = web.Application(middlewares=[guard], client_max_size=MAX_BODY_BYTES)
    job_page = (STATIC_DIR / "job.html").read_text(encoding="utf-8")

    async def index(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / "index.html")

    async def job_html(request: web.Request) -> web.Response:
        # The one value put into HTML on the server: escaped, quotes included (it sits in an
        # attribute too). Everything else reaches the page as JSON and is shown as text.
        body = job_page.replace(JOB_PAGE_SLOT, html.escape(request.match_info["job_id"], quote=True))
        return web.Response(text=body, content_type="text/html", charset="utf-8")

    async def list_jobs(request: web.Request) -> web.Response:
        return web.json_response({"jobs": await dashboard.list_jobs()})

    async def job(request: web.Request) -> web.Response:
        return web.json_response(await dashboard.job(request.match_info["job_id"]))

    async def metrics(request: web.Request) -> web.Response:
        return web.json_response(await dashboard.metrics(request.match_info["job_id"]))

    async def checkpoints(request: web.Request) -> web.Response:
        return web.json_response(await dashboard.checkpoints(request.match_info["job_id"]))

    async def stop(request: web.Request) -> web.Response:
        body = await _json_object(request)
        mode = body.get("mode", "checkpoint")
        if not isinstance(mode, str):
            raise ValueError("mode: expected a string, e.g. \"checkpoint\"")
        return web.json_response({"message": await dashboard.stop(request.match_info["job_id"], mode)})

    async def rescale(request: web.Request) -> web.Response:
        body = await _json_object(request)
        message = await dashboard.rescale(
            request.match_info["job_id"], body.get("parallelism"), body.get("overrides")
        )
        return web.json_response({"message": message})

    async def restart(request: web.Request) -> web.Response:
        body = await _json_object(request)
        force, ignore_state = body.get("force", False), body.get("ignore_state", False)
        if not isinstance(force, bool) or not isinstance(ignore_state, bool):
            raise ValueError("force and ignore_state: expected true or false")
        message = await dashboard.restart(request.match_info["job_id"], force, ignore_state)
        return web.json_response({"message": message})

    app.router.add_get("/", index)
    app.router.add_get("/jobs/{job_id}", job_html)
    app.router.add_static("/static/", STATIC_DIR, append_version=False)
    app.router.add_get("/api/jobs", list_jobs)
    app.router.add_get("/api/jobs/{job_id}", job)
    app.router.add_get("/api/jobs/{job_id}/metrics", metrics)
    app.router.add_get("/api/jobs/{job_id}/checkpoints", checkpoints)
    app.router.add_post("/api/jobs/{job_id}/stop", stop)
    app.router.add_post("/api/jobs/{job_id}/rescale", rescale)
    app.router.add_post("/api/jobs/{job_id}/restart", restart)
    return app


async def _json_object(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body; `ValueError` naming what is wrong otherwise."""
    try:
        body = await request.json()
    except json.JSONDecodeError as exc:
        raise ValueError(f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ValueError("the body must be one JSON object")
    return body


class DashboardServer:
    """The dashboard served on `host:port` inside the caller's event loop (port 0: any free one)."""

    def __init__(self, dashboard: Dashboard, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._runner = web.AppRunner(create_app(dashboard, bind_host=host), access_log=None)

    @property
    def url(self) -> str:
        """The dashboard's address for a browser (the job list)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def job_url(self, job_id: str) -> str:
        """The page of one job."""
        return f"{self.url}jobs/{quote(job_id, safe='')}"

    async def start(self) -> None:
        """Bind and serve; `OSError` when the port is taken. Afterwards `port` is the bound one."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            raise
        for address in self._runner.addresses:  # (host, port[, flow, scope]) of each bound socket
            self.port = int(address[1])

    async def stop(self) -> None:
        """Stop serving (open requests are cut short)."""
        await self._runner.cleanup()
