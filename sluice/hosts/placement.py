"""Which hosts a generation's runners go to: a pure function of the registered hosts and a request.

No Temporal here: the registry workflow calls `place` inside an update handler, so everything is
deterministic (hosts are visited in host_id order, never in set or hash order).

Guarantees of `place`:
- all or nothing: either every requested runner has a host, or no host gets any (and the
  placement says why in one line);
- no host gets more runners than it has free slots, where the requesting job's own existing
  reservations (any generation) count as free: the new generation replaces them;
- every host used carries every label the request asks for;
- spread: runners go one at a time to the eligible host with the most free slots left (ties to
  the smaller host_id), so free capacity stays as even as possible and equal hosts get shares
  that differ by at most one;
- shares are ordered by host_id and number their runners consecutively from 0.
"""

from __future__ import annotations

import heapq

from sluice.hosts.contracts import HostRecord, HostShare, Placement, PlaceRequest

#: A waiting reason names at most this many hosts (it is one line for `sluice status`).
HOSTS_NAMED_IN_REASON = 10
NO_HOST_REASON = "no runner host is registered (start one with sluice host)"


def format_labels(labels: dict[str, str]) -> str:
    """`k=v,k2=v2` in key order: how labels are shown to users."""
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def has_labels(host: HostRecord, labels: dict[str, str]) -> bool:
    """True when `host` carries every label in `labels` with the same value."""
    return all(host.labels.get(k) == v for k, v in labels.items())


def free_for(host: HostRecord, job_id: str) -> int:
    """Slots of `host` that job `job_id` may use: free slots plus the job's own reservations there."""
    in_use_by_others = host.slots_in_use - host.jobs.get(job_id, 0)
    return max(0, host.slots - in_use_by_others)


def _named(parts: list[str]) -> str:
    """At most HOSTS_NAMED_IN_REASON parts, joined, with a count of the rest."""
    shown = ", ".join(parts[:HOSTS_NAMED_IN_REASON])
    rest = len(parts) - HOSTS_NAMED_IN_REASON
    return f"{shown} and {rest} more" if rest > 0 else shown


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def place(hosts: list[HostRecord], req: PlaceRequest) -> Placement:
    """Place `req.runners` runners of job `req.job_id` on `hosts` (see the module docstring).

    Returns the shares, or no shares and a `waiting_reason` naming what is needed and what is
    offered. Zero runners: an empty placement with no waiting reason.
    """
    if req.runners == 0:
        return Placement()
    if not hosts:
        return Placement(waiting_reason=f"needs {_plural(req.runners, 'runner slot')}: {NO_HOST_REASON}")
    ordered = sorted(hosts, key=lambda h: h.host_id)
    eligible = [h for h in ordered if has_labels(h, req.labels)]
    excluded = [h for h in ordered if not has_labels(h, req.labels)]
    need = _plural(req.runners, "runner slot")
    if not eligible:
        return Placement(
            waiting_reason=(
                f"needs {need}, but no host has labels {format_labels(req.labels)} "
                f"({_plural(len(ordered), 'host')} registered: {_named([h.host_id for h in ordered])})"
            )
        )
    free = {h.host_id: free_for(h, req.job_id) for h in eligible}
    total_free = sum(free.values())
    if total_free < req.runners:
        where = f" on hosts with labels {format_labels(req.labels)}" if req.labels else ""
        offer = _named([f"{h.host_id} {free[h.host_id]}/{h.slots} free" for h in eligible])
        reason = f"needs {need}{where}, {total_free} free: {offer}"
        if excluded:
            reason += (
                f"; {_plural(len(excluded), 'host')} without those labels: "
                f"{_named([h.host_id for h in excluded])}"
            )
        return Placement(waiting_reason=reason)

    # Most free slots first, ties to the smaller host_id: a max-heap on (free, reversed id order)
    # via (-free, host_id).
    heap = [(-free[h.host_id], h.host_id) for h in eligible]
    heapq.heapify(heap)
    counts: dict[str, int] = {}
    for _ in range(req.runners):
        neg_free, host_id = heapq.heappop(heap)
        counts[host_id] = counts.get(host_id, 0) + 1
        if neg_free + 1 < 0:  # the host still has a free slot after this runner
            heapq.heappush(heap, (neg_free + 1, host_id))
    shares: list[HostShare] = []
    index = 0
    for h in eligible:  # host_id order
        n = counts.get(h.host_id, 0)
        if n:
            shares.append(
                HostShare(host_id=h.host_id, task_queue=h.task_queue, address=h.address, runners=n, first_index=index)
            )
            index += n
    return Placement(shares=shares)
