"""sluice.hosts.placement.place: examples for the reasons users read, and properties over any
set of hosts (hypothesis): never over-subscribes, all or nothing, labels respected, spread."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.hosts.contracts import HostRecord, Placement, PlaceRequest, host_task_queue
from sluice.hosts.placement import NO_HOST_REASON, free_for, has_labels, place

JOB = "job-1"
EXAMPLES = 300  # hypothesis examples per property: a fraction of a second each


def host(host_id: str, slots: int, used: int = 0, labels: dict[str, str] | None = None,
         jobs: dict[str, int] | None = None) -> HostRecord:
    """A host with `used` slots held by other jobs (plus `jobs`, counted in slots_in_use)."""
    held = dict(jobs or {})
    if used:
        held["other"] = held.get("other", 0) + used
    return HostRecord(
        host_id=host_id, task_queue=host_task_queue(host_id), address=f"{host_id}:0", slots=slots,
        slots_in_use=sum(held.values()), labels=labels or {}, jobs=held,
    )


def shares_by_host(p: Placement) -> dict[str, int]:
    return {s.host_id: s.runners for s in p.shares}


# ------------------------------------------------------------------------------ examples


def test_spread_over_two_equal_hosts() -> None:
    p = place([host("b", 4), host("a", 4)], PlaceRequest(job_id=JOB, generation=1, runners=3))
    assert p.waiting_reason is None
    assert [(s.host_id, s.runners, s.first_index) for s in p.shares] == [("a", 2, 0), ("b", 1, 2)]
    assert p.shares[0].task_queue == host_task_queue("a") and p.shares[0].address == "a:0"


def test_most_free_host_first() -> None:
    p = place([host("a", 4, used=3), host("b", 4)], PlaceRequest(job_id=JOB, generation=1, runners=3))
    assert shares_by_host(p) == {"b": 3}


def test_zero_runners_is_an_empty_placement() -> None:
    assert place([], PlaceRequest(job_id=JOB, generation=1, runners=0)) == Placement()


def test_no_host_registered() -> None:
    p = place([], PlaceRequest(job_id=JOB, generation=1, runners=2))
    assert p.shares == [] and p.waiting_reason is not None
    assert NO_HOST_REASON in p.waiting_reason and "needs 2 runner slots" in p.waiting_reason


def test_not_enough_slots_names_need_and_offer() -> None:
    p = place([host("host-a", 2, used=2), host("host-b", 1)], PlaceRequest(job_id=JOB, generation=1, runners=3))
    assert p.shares == []
    assert p.waiting_reason == "needs 3 runner slots, 1 free: host-a 0/2 free, host-b 1/1 free"


def test_labels_no_host_has_them() -> None:
    p = place([host("a", 2), host("b", 2, labels={"zone": "us"})],
              PlaceRequest(job_id=JOB, generation=1, runners=1, labels={"zone": "eu"}))
    assert p.shares == [] and p.waiting_reason is not None
    assert "no host has labels zone=eu" in p.waiting_reason and "a, b" in p.waiting_reason


def test_labels_some_hosts_excluded() -> None:
    hosts = [host("a", 8), host("b", 1, labels={"zone": "eu"})]
    p = place(hosts, PlaceRequest(job_id=JOB, generation=1, runners=2, labels={"zone": "eu"}))
    assert p.waiting_reason == (
        "needs 2 runner slots on hosts with labels zone=eu, 1 free: b 1/1 free; 1 host without those labels: a"
    )
    ok = place(hosts, PlaceRequest(job_id=JOB, generation=1, runners=1, labels={"zone": "eu"}))
    assert shares_by_host(ok) == {"b": 1}


def test_own_reservations_count_as_free() -> None:
    # The job holds all of "a" for its old generation: the new generation may take it over.
    p = place([host("a", 2, jobs={JOB: 2})], PlaceRequest(job_id=JOB, generation=2, runners=2))
    assert shares_by_host(p) == {"a": 2}


# ------------------------------------------------------------------------------ properties

LABEL_VALUES = st.sampled_from(["eu", "us"])


@st.composite
def hosts_and_request(draw: st.DrawFn) -> tuple[list[HostRecord], PlaceRequest]:
    n = draw(st.integers(min_value=0, max_value=8))
    hosts: list[HostRecord] = []
    for i in range(n):
        slots = draw(st.integers(min_value=0, max_value=6))
        own = draw(st.integers(min_value=0, max_value=slots))
        other = draw(st.integers(min_value=0, max_value=slots - own + 1))  # may over-subscribe
        labels = draw(st.dictionaries(st.just("zone"), LABEL_VALUES, max_size=1))
        jobs = {k: v for k, v in ((JOB, own), ("other", other)) if v}
        hosts.append(host(f"h{i}", slots, labels=labels, jobs=jobs))
    labels = draw(st.dictionaries(st.just("zone"), LABEL_VALUES, max_size=1))
    runners = draw(st.integers(min_value=0, max_value=30))
    return hosts, PlaceRequest(job_id=JOB, generation=3, runners=runners, labels=labels)


@settings(max_examples=EXAMPLES, deadline=None)
@given(hosts_and_request())
def test_all_or_nothing_within_capacity_and_labels(case: tuple[list[HostRecord], PlaceRequest]) -> None:
    hosts, req = case
    p = place(hosts, req)
    by_id = {h.host_id: h for h in hosts}
    eligible = [h for h in hosts if has_labels(h, req.labels)]
    capacity = sum(free_for(h, req.job_id) for h in eligible)
    if req.runners == 0:
        assert p == Placement()
        return
    if capacity < req.runners:
        assert p.shares == [] and p.waiting_reason  # nothing reserved, and why
        assert "\n" not in p.waiting_reason
        return
    assert p.waiting_reason is None
    assert sum(s.runners for s in p.shares) == req.runners  # every runner placed
    for s in p.shares:
        assert s.runners <= free_for(by_id[s.host_id], req.job_id)  # never over-subscribed
        assert has_labels(by_id[s.host_id], req.labels)
    assert [s.host_id for s in p.shares] == sorted(s.host_id for s in p.shares)
    assert len({s.host_id for s in p.shares}) == len(p.shares)
    indices = [i for s in p.shares for i in range(s.first_index, s.first_index + s.runners)]
    assert indices == list(range(req.runners))


@settings(max_examples=EXAMPLES, deadline=None)
@given(hosts_and_request())
def test_spread_evens_out_free_slots(case: tuple[list[HostRecord], PlaceRequest]) -> None:
    # The greedy's invariant: a host that got a runner had the most free slots when it got it,
    # so afterwards it has at least as many left as any eligible host, minus one.
    hosts, req = case
    p = place(hosts, req)
    got = shares_by_host(p)
    left = {h.host_id: free_for(h, req.job_id) - got.get(h.host_id, 0) for h in hosts if has_labels(h, req.labels)}
    for host_id in got:
        assert left[host_id] >= max(left.values()) - 1


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=10),
    free=st.integers(min_value=1, max_value=20),
    runners=st.integers(min_value=1, max_value=200),
)
def test_equal_hosts_with_capacity_to_spare_get_shares_within_one(n: int, free: int, runners: int) -> None:
    runners = min(runners, n * free)
    p = place([host(f"h{i}", free) for i in range(n)], PlaceRequest(job_id=JOB, generation=1, runners=runners))
    counts = [shares_by_host(p).get(f"h{i}", 0) for i in range(n)]
    assert max(counts) - min(counts) <= 1
