"""The controller's client of one runner's control API (docs/runner-protocol.md).

Every failure is one of two errors, so activities can decide without parsing HTTP:

- `RunnerUnavailable`: the runner cannot be reached, its connection broke or timed out, it answered
  with a server error (5xx), or its event stream ended. A killed runner process is noticed as soon
  as the kernel closes its socket (well under a second on one host).
- `RunnerRefused` (here as its subclass `RunnerRequestRefused`, which also carries the HTTP status
  and, for a failed /start, the failure's domain and retryability): the runner answered 4xx.

A runner that is alive but silent (frozen by SIGSTOP, its loop blocked, or cut off by the network)
closes nothing: its event stream is noticed by the heartbeat timeout of `events()`, which raises
`RunnerSilent` (a `RunnerUnavailable`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any, Literal

import aiohttp
import aiohttp.http_exceptions
from pydantic import ValidationError

from sluice.auth import GENERATION_HEADER, JOB_HEADER
from sluice.errors import RunnerRefused, RunnerUnavailable
from sluice.models import RunnerEvent, RunnerInfo, StartRequest, SubtaskSnapshot
from sluice.runner.protocol import CheckpointWaitResult

REQUEST_TIMEOUT_S = 10.0
"""Total time for a short control request (health, checkpoint, stop, shutdown)."""
CONNECT_TIMEOUT_S = 3.0
"""Connecting to a runner on its host; a runner that does not accept within this is unavailable."""
START_TIMEOUT_S = 120.0
"""Default bound of POST /start: opening operators and restoring state (task startup timeout)."""
WAIT_MARGIN_S = 5.0
"""Extra HTTP time for a long-poll beyond the wait the runner was asked to do."""
EVENT_LINE_LIMIT = 16 * 1024 * 1024
"""Largest event line accepted (a heartbeat of a runner with very many subtasks is large)."""


class RunnerRequestRefused(RunnerRefused):
    """A 4xx from a runner: `status`, the runner's `message`, and for /start failures its
    `domain` (user/internal/external) and `retryable`."""

    def __init__(
        self, message: str, *, status: int, domain: str | None = None, retryable: bool | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.domain = domain
        self.retryable = retryable


class RunnerSilent(RunnerUnavailable):
    """The runner's event stream stayed open but brought nothing (not even the heartbeat it sends
    every second) for `silent_s` seconds: the runner is hung, stopped or cut off."""

    def __init__(self, message: str, *, silent_s: float) -> None:
        super().__init__(message)
        self.silent_s = silent_s


class RunnerClient:
    """Talks to one runner of one job generation; use as `async with RunnerClient(...) as c`.

    Owns its aiohttp session, so it works from any activity without shared state.
    """

    def __init__(self, info: RunnerInfo, job_id: str, token: str) -> None:
        self.info = info
        self.job_id = job_id
        self._headers = {
            "Authorization": f"Bearer {token}",
            JOB_HEADER: job_id,
            GENERATION_HEADER: str(info.generation),
        }
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> RunnerClient:
        self._session = aiohttp.ClientSession(
            base_url=self.info.control_url,
            headers=self._headers,
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("RunnerClient used outside `async with`")
        return self._session

    # ---------------------------------------------------------------------------- requests

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        """One request; returns the decoded JSON answer (or None), or raises the two errors."""
        timeout = (
            aiohttp.ClientTimeout(total=timeout_s, connect=CONNECT_TIMEOUT_S)
            if timeout_s is not None
            else None
        )
        kwargs: dict[str, Any] = {"params": params}
        if timeout is not None:
            kwargs["timeout"] = timeout
        if body is not None:
            kwargs["data"] = body if isinstance(body, (bytes, str)) else json.dumps(body)
            kwargs["headers"] = {"Content-Type": "application/json"}
        what = f"runner {self.info.runner_id} ({self.info.control_url}) {method} {path}"
        try:
            async with self.session.request(method, path, **kwargs) as resp:
                text = await resp.text()
                status = resp.status
        except TimeoutError as e:
            raise RunnerUnavailable(f"{what}: timed out") from e
        except (aiohttp.ClientError, aiohttp.http_exceptions.HttpProcessingError, OSError) as e:
            raise RunnerUnavailable(f"{what}: {type(e).__name__}: {e}") from e
        data: Any = None
        if text:
            try:
                data = json.loads(text)
            except ValueError:
                data = None
        if 400 <= status < 500:
            detail = data if isinstance(data, dict) else {}
            message = str(detail.get("error") or text or f"HTTP {status}")
            raise RunnerRequestRefused(
                f"{what}: {status}: {message}",
                status=status,
                domain=detail.get("domain"),
                retryable=detail.get("retryable"),
            )
        if status >= 500:
            error = data.get("error") if isinstance(data, dict) else text
            raise RunnerUnavailable(f"{what}: {status}: {error}")
        return data

    async def health(self) -> dict[str, Any]:
        """`{"runner_id", "generation", "tasks": {label: state}, ...}`."""
        data = await self._request("GET", "/health")
        if not isinstance(data, dict):
            raise RunnerUnavailable(f"runner {self.info.runner_id}: /health answered {data!r}")
        return data

    async def start(self, req: StartRequest, *, timeout_s: float = START_TIMEOUT_S) -> dict[str, str]:
        """Hand the runner its subtasks; returns once all opened (label -> state).

        Idempotent for the same generation. A subtask that fails to open raises
        `RunnerRequestRefused` (status 400) whose message names the operator and subtask.
        """
        data = await self._request(
            "POST", "/start", body=req.model_dump_json(), timeout_s=timeout_s
        )
        return dict((data or {}).get("tasks") or {})

    async def checkpoint(self, epoch: int, then_stop: bool = False) -> None:
        """Inject barrier `epoch` at this runner's sources (a repeated epoch is ignored)."""
        await self._request("POST", "/checkpoint", body={"epoch": epoch, "then_stop": then_stop})

    async def wait_checkpoint(
        self, epoch: int, timeout_s: float
    ) -> tuple[bool, list[SubtaskSnapshot], str | None]:
        """Wait up to `timeout_s` for every subtask here to snapshot `epoch`.

        Returns (done, snapshots so far, failure message or None). Long waits are split into
        several long-polls, each bounded by the runner's own maximum.
        """
        result = await self.wait_checkpoint_result(epoch, timeout_s)
        return result.done, result.snapshots, result.failed

    async def wait_checkpoint_result(self, epoch: int, timeout_s: float) -> CheckpointWaitResult:
        """`wait_checkpoint` with the runner's whole answer (also the failed task's event)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout_s, 0.0)
        while True:
            remaining = max(deadline - loop.time(), 0.0)
            data = await self._request(
                "GET",
                f"/checkpoint/{epoch}",
                params={"timeout": f"{remaining:.3f}"},
                timeout_s=remaining + WAIT_MARGIN_S,
            )
            try:
                result = CheckpointWaitResult.model_validate(data)
            except ValidationError as e:
                raise RunnerUnavailable(
                    f"runner {self.info.runner_id}: malformed checkpoint answer: {e}"
                ) from e
            if result.done or result.failed is not None or loop.time() >= deadline:
                return result

    async def stop(self, mode: Literal["graceful", "immediate"]) -> None:
        """graceful: sources end and downstream drains; immediate: tasks are cancelled now."""
        await self._request("POST", "/stop", body={"mode": mode})

    async def shutdown(self) -> None:
        """Ask the runner process to exit. A runner that is already gone counts as done."""
        try:
            await self._request("POST", "/shutdown")
        except RunnerUnavailable:
            pass

    async def events(self, heartbeat_timeout_s: float | None = None) -> AsyncIterator[RunnerEvent]:
        """The runner's event stream: `hello` first, then task events and heartbeats.

        Never ends normally: when the stream closes (runner exited or was killed), the runner is
        unreachable, or no line arrived within `heartbeat_timeout_s` (hung or partitioned runner),
        it raises `RunnerUnavailable`.
        """
        what = f"runner {self.info.runner_id} ({self.info.control_url}) event stream"
        timeout = aiohttp.ClientTimeout(
            total=None, connect=CONNECT_TIMEOUT_S, sock_read=heartbeat_timeout_s
        )
        try:
            async with self.session.get("/events", timeout=timeout) as resp:
                if resp.status != 200:
                    text = await resp.text()
                    try:
                        message = json.loads(text).get("error", text)
                    except (ValueError, AttributeError):
                        message = text
                    if 400 <= resp.status < 500:
                        raise RunnerRequestRefused(
                            f"{what}: {resp.status}: {message}", status=resp.status
                        )
                    raise RunnerUnavailable(f"{what}: {resp.status}: {message}")
                while True:
                    line = await resp.content.readline(max_line_length=EVENT_LINE_LIMIT)
                    if not line:
                        raise RunnerUnavailable(f"{what}: closed by the runner")
                    if not line.endswith(b"\n"):
                        raise RunnerUnavailable(f"{what}: connection broke mid-event")
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        event = RunnerEvent.model_validate_json(line)
                    except ValidationError as e:
                        raise RunnerUnavailable(f"{what}: malformed event {line[:200]!r}: {e}") from e
                    yield event
        except aiohttp.ConnectionTimeoutError as e:
            raise RunnerUnavailable(f"{what}: cannot connect within {CONNECT_TIMEOUT_S:g} s") from e
        except TimeoutError as e:
            silent = heartbeat_timeout_s or 0.0
            raise RunnerSilent(f"{what}: no event for {silent:g} s", silent_s=silent) from e
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as e:
            # What a killed runner process looks like from here: its connection dropped mid-stream.
            raise RunnerUnavailable(f"{what}: connection lost (runner process exited?)") from e
        except (aiohttp.ClientConnectionError, ConnectionError) as e:
            raise RunnerUnavailable(f"{what}: cannot connect (runner process gone?): {e}") from e
        except (aiohttp.ClientError, aiohttp.http_exceptions.HttpProcessingError, OSError) as e:
            raise RunnerUnavailable(f"{what}: {type(e).__name__}: {e}") from e
