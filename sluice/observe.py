"""A job's metrics and runner logs from every host that runs it: the client side of the hosts'
endpoints (sluice/hosts/endpoint.py).

Hosts publish their endpoint's URL in the host registry (`HostRecord.endpoint`); the job's status
names the hosts of its runners (`runners[].host_id`). So:

- :func:`job_metrics` asks each host of the job's current generation for `GET
  /jobs/{job_id}/metrics` and adds the answers up per operator (counts, rates, subtasks summed;
  watermark lag and backpressure the highest). A host that cannot be asked (no endpoint, no
  answer within HOST_REQUEST_TIMEOUT_S) is listed in `unreachable` and leaves its runners out,
  so a partial answer says that it is partial.
- :func:`job_logs` streams the runner log lines (`[gG-rR] line`) of every registered host with
  an endpoint that has logs of the job; it raises :class:`NoRemoteLogs` (before yielding
  anything) when none has, so `sluice logs` can read this machine's files instead.

The JSON shape of :class:`JobMetrics` is documented in docs/metrics.md and kept stable: fields may
be added, never renamed or removed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import aiohttp
from temporalio.client import Client

from sluice.hosts.job_metrics import JobMetrics, OperatorMetrics, combine
from sluice.hosts.registry_client import list_hosts

__all__ = ["HOST_REQUEST_TIMEOUT_S", "JobMetrics", "NoRemoteLogs", "OperatorMetrics", "job_logs", "job_metrics"]

HOST_REQUEST_TIMEOUT_S = 5.0
"""Longest wait for one host's answer to a metrics request (or to start sending logs)."""


class NoRemoteLogs(Exception):
    """No host endpoint has runner logs of the job (or none could be asked)."""


def _temporal_client(client: Any) -> Client:
    """Accept a temporalio Client or a sluice JobClient (which wraps one)."""
    return client if isinstance(client, Client) else client.client


async def _endpoints(client: Client) -> dict[str, str | None]:
    """host id -> its endpoint URL (None: it serves none), for every registered host."""
    return {h.host_id: h.endpoint for h in await list_hosts(client)}


async def job_metrics(client: Any, job_id: str) -> JobMetrics:
    """The job's per-operator metrics summed (maxed) over every host running its current
    generation. `client`: a temporalio Client or a sluice JobClient. Raises JobNotFound for an
    unknown job; a job without runners (not Running) has no operators."""
    from sluice.client import JobClient

    temporal = _temporal_client(client)
    status = await JobClient(temporal).status(job_id)
    host_ids = sorted({r.host_id for r in status.runners if r.host_id is not None})
    result = JobMetrics(job_id=job_id, generation=status.generation if status.runners else None)
    if not host_ids:
        return result
    endpoints = await _endpoints(temporal)
    timeout = aiohttp.ClientTimeout(total=HOST_REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        answers = await asyncio.gather(
            *(_host_metrics(session, endpoints.get(h), job_id) for h in host_ids)
        )
    parts: list[dict[str, OperatorMetrics]] = []
    for host_id, answer in zip(host_ids, answers):
        if answer is None or (answer.generation is not None and answer.generation != status.generation):
            result.unreachable.append(host_id)
            continue
        result.hosts.append(host_id)
        parts.append(answer.operators)
    result.operators = combine(parts)
    return result


async def _host_metrics(session: aiohttp.ClientSession, endpoint: str | None, job_id: str) -> JobMetrics | None:
    if endpoint is None:
        return None
    try:
        async with session.get(f"{endpoint}/jobs/{quote(job_id, safe='')}/metrics") as resp:
            if resp.status != 200:
                return None
            return JobMetrics.model_validate_json(await resp.read())
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


async def job_logs(
    client: Any,
    job_id: str,
    *,
    generation: int | None = None,
    runner: int | None = None,
    tail: int = 100,
    follow: bool = False,
) -> AsyncIterator[str]:
    """The job's runner log lines from every host endpoint that has them: the last `tail` lines of
    each runner log, then (with `follow`) new lines as they are written, until cancelled.
    `generation` default: the job's current one when its status answers, else each host's newest.
    Raises NoRemoteLogs, before the first line, when no endpoint has logs of the job."""
    temporal = _temporal_client(client)
    if generation is None:
        generation = await _current_generation(temporal, job_id)
    try:
        endpoints = [url for url in (await _endpoints(temporal)).values() if url]
    except Exception as e:  # noqa: BLE001 - no registry answer: the caller reads local files
        raise NoRemoteLogs(f"the host registry did not answer: {e}") from e
    params: dict[str, str] = {"tail": str(tail), "follow": "1" if follow else "0"}
    if generation is not None:
        params["generation"] = str(generation)
    if runner is not None:
        params["runner"] = str(runner)
    # A followed stream may stay quiet for as long as the runners do: only connecting is bounded.
    timeout = aiohttp.ClientTimeout(
        total=None if follow else HOST_REQUEST_TIMEOUT_S, sock_connect=HOST_REQUEST_TIMEOUT_S
    )
    async with aiohttp.ClientSession(timeout=timeout) as session:
        opened = await asyncio.gather(*(_open_logs(session, url, job_id, params) for url in endpoints))
        streams = [resp for resp in opened if resp is not None]
        if not streams:
            raise NoRemoteLogs(f"no host endpoint has runner logs of job {job_id}")
        try:
            if not follow:
                for resp in streams:
                    for line in (await resp.text()).splitlines():
                        yield line
                return
            async for line in _merge_lines(streams):
                yield line
        finally:
            for resp in streams:
                resp.release()


async def _current_generation(client: Client, job_id: str) -> int | None:
    from sluice.client import JobClient

    try:
        return (await JobClient(client).status(job_id)).generation
    except Exception:  # noqa: BLE001 - unknown or unanswered: each host's newest generation
        return None


async def _open_logs(
    session: aiohttp.ClientSession, endpoint: str, job_id: str, params: dict[str, str]
) -> aiohttp.ClientResponse | None:
    try:
        resp = await session.get(f"{endpoint}/jobs/{quote(job_id, safe='')}/logs", params=params)
    except (aiohttp.ClientError, TimeoutError):
        return None
    if resp.status != 200:  # 404: no logs of the job there
        resp.release()
        return None
    return resp


async def _merge_lines(streams: list[aiohttp.ClientResponse]) -> AsyncIterator[str]:
    """Lines of several streaming responses as they arrive, until all of them ended."""
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    async def pump(resp: aiohttp.ClientResponse) -> None:
        try:
            async for raw in resp.content:
                await queue.put(raw.decode("utf-8", "replace").rstrip("\n"))
        except (aiohttp.ClientError, TimeoutError):
            pass  # that host went away: the others go on
        finally:
            await queue.put(None)

    pumps = [asyncio.create_task(pump(resp)) for resp in streams]
    try:
        ended = 0
        while ended < len(pumps):
            line = await queue.get()
            if line is None:
                ended += 1
            else:
                yield line
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
