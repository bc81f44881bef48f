"""The computations behind the metrics, without processes: backpressure over intervals, watermark
lag, rates from heartbeats, combining hosts, merging runners' expositions, log tails; and a real
local channel whose full queue shows as backpressure."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pyarrow as pa
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sluice.auth import runner_token
from sluice.engine.channels import ChannelId, DataServer, LocalChannel, RemoteSender, secret_authorizer
from sluice.engine.messages import Watermark
from sluice.engine.taskmetrics import BackpressureMeter, BlockedClock, watermark_lag_s
from sluice.hosts.endpoint import ObservabilityEndpoint, merge_expositions
from sluice.hosts.job_metrics import HeartbeatSeries, OperatorMetrics, combine
from sluice.hosts.runner_logs import LogReader, LogsNotFound, pick_generation
from sluice.models import SubtaskRef
from sluice.runner.metrics import RunnerMetrics, heartbeat_metrics


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_blocked_clock_counts_a_wait_in_progress() -> None:
    clock = FakeClock()
    blocked = BlockedClock(clock)
    blocked.start()
    clock.now += 2.0
    assert blocked.total() == pytest.approx(2.0)  # still blocked: counted up to now
    blocked.stop()
    clock.now += 5.0
    assert blocked.total() == pytest.approx(2.0)


def test_backpressure_is_the_blocked_fraction_of_the_last_interval() -> None:
    clock = FakeClock()
    blocked = BlockedClock(clock)
    meter = BackpressureMeter(lambda: [blocked], interval_s=4.0, clock=clock)
    assert meter.fraction() == 0.0
    clock.now += 1.0
    blocked.start()
    clock.now += 1.0
    blocked.stop()
    clock.now += 2.0  # 1 s of 4 blocked
    assert meter.fraction() == pytest.approx(0.25)
    clock.now += 1.0  # mid-interval: the last complete interval's value holds
    assert meter.fraction() == pytest.approx(0.25)
    blocked.start()  # blocked for the whole next interval, and still blocked when read
    clock.now += 3.0
    assert meter.fraction() == pytest.approx(0.75)  # the interval from t=104 is 4 s, 3 blocked
    clock.now += 4.0
    assert meter.fraction() == pytest.approx(1.0)


def test_backpressure_of_several_senders_is_capped_at_one() -> None:
    clock = FakeClock()
    a, b = BlockedClock(clock), BlockedClock(clock)
    meter = BackpressureMeter(lambda: [a, b], interval_s=1.0, clock=clock)
    a.start()
    b.start()
    clock.now += 1.0
    assert meter.fraction() == 1.0


def test_watermark_lag_is_wall_clock_minus_event_time() -> None:
    assert watermark_lag_s(None) is None
    assert watermark_lag_s(1_000_000, now_s=1_010.5) == pytest.approx(10.5)
    assert watermark_lag_s(2_000_000, now_s=1_000.0) == pytest.approx(-1000.0)  # event time ahead


async def test_a_full_local_channel_blocks_its_sender_and_counts_as_backpressure() -> None:
    channel = LocalChannel(capacity=1)
    meter = BackpressureMeter(lambda: [channel.blocked], interval_s=60.0)
    await channel.send(Watermark(1))
    assert channel.blocked.total() == 0.0  # room: no wait, nothing counted
    send = asyncio.ensure_future(channel.send(Watermark(2)))
    await asyncio.sleep(0.2)
    assert not send.done()
    assert channel.blocked.total() >= 0.1  # the wait in progress counts
    assert meter.fraction() > 0.5
    await channel.receive()
    await send
    assert channel.blocked.total() >= 0.1


async def test_a_slow_remote_receiver_counts_as_backpressure() -> None:
    """A real TCP channel whose receiver reads nothing: the sender ends up waiting in send()."""
    job, channel_id = "job-bp", ChannelId("a->b", 0, 0)
    server = DataServer(secret_authorizer(b"secret"), registration_timeout_s=5.0)
    await server.start("127.0.0.1", 0)
    try:
        inbound = server.register(job, 1, channel_id, capacity=1)
        sender = await RemoteSender.connect(
            "127.0.0.1", server.port, job_id=job, generation=1, token=runner_token(b"secret", job, 1),
            channel=channel_id, capacity_bytes=64 * 1024,
        )  # fmt: skip
        batch = pa.record_batch({"v": pa.array(range(1 << 17), pa.int64())})  # 1 MiB
        meter = BackpressureMeter(lambda: [sender.blocked], interval_s=60.0)
        producing = asyncio.ensure_future(_send_forever(sender, batch))
        try:
            await asyncio.sleep(1.0)
            assert not producing.done()
            assert sender.blocked.total() > 0.5  # most of that second was spent waiting
            assert meter.fraction() > 0.5
            assert len(inbound) <= 1  # the receiver took no more than its queue holds
        finally:
            producing.cancel()
            await asyncio.gather(producing, return_exceptions=True)
            await inbound.close()  # first: a sender closing with unread data would wait to flush it
            await sender.close()
    finally:
        await server.close()


async def _send_forever(sender: RemoteSender, batch: pa.RecordBatch) -> None:
    while True:
        await sender.send(batch)


class FakeTask:
    """A subtask as the runner sees it: only its metrics mapping."""

    def __init__(self, metrics: dict[str, float]) -> None:
        self.metrics = metrics


def test_heartbeat_sums_counts_and_takes_the_highest_lag_and_backpressure() -> None:
    beat = heartbeat_metrics([
        FakeTask({"records_in.map": 10, "records_out.map": 5, "backpressure.map": 0.2, "watermark_lag_s.map": 3.0}),
        FakeTask({"records_in.map": 20, "records_out.map": 7, "backpressure.map": 0.6}),
    ])  # fmt: skip
    assert beat["records_in.map"] == 30 and beat["records_out.map"] == 12 and beat["subtasks.map"] == 2
    assert beat["backpressure.map"] == pytest.approx(0.6) and beat["watermark_lag_s.map"] == pytest.approx(3.0)


def test_rates_come_from_successive_heartbeats() -> None:
    series = HeartbeatSeries(window_s=10.0)
    series.add({"subtasks.map": 1, "records_in.map": 100, "records_out.map": 50}, now=0.0)
    assert series.operators()["map"].records_in_per_s == 0.0  # one heartbeat: no rate yet
    series.add({"subtasks.map": 1, "records_in.map": 300, "records_out.map": 150}, now=2.0)
    m = series.operators()["map"]
    assert (m.records_in, m.records_in_per_s, m.records_out_per_s) == (300, 100.0, 50.0)
    assert m.watermark_lag_s is None  # no watermark reported
    series.add({"subtasks.map": 1, "records_in.map": 300, "records_out.map": 150}, now=20.0)
    assert series.operators()["map"].records_in_per_s == 0.0  # the old samples left the window


def test_combining_hosts_sums_counts_and_takes_the_highest_gauges() -> None:
    a = {"map": OperatorMetrics(records_in=10, records_in_per_s=1, watermark_lag_s=None, backpressure=0.1, subtasks=1)}
    b = {"map": OperatorMetrics(records_in=5, records_in_per_s=2, watermark_lag_s=4.0, backpressure=0.3, subtasks=2),
         "sink": OperatorMetrics(records_in=1, subtasks=1)}  # fmt: skip
    out = combine([a, b])
    assert list(out) == ["map", "sink"]
    assert out["map"] == OperatorMetrics(records_in=15, records_in_per_s=3, watermark_lag_s=4.0,
                                         backpressure=0.3, subtasks=3)  # fmt: skip


def test_merged_runner_expositions_keep_one_family_per_metric() -> None:
    def runner(runner_id: str, n: float) -> str:
        task = FakeTask({"records_in.map": n, "backpressure.map": 0.5, "watermark_lag_s.map": 2.0})
        metrics = RunnerMetrics(job_id="j", generation=1, runner_id=runner_id,
                                tasks=lambda: [(SubtaskRef(chain=0, index=0), task, "running")])  # fmt: skip
        return metrics.render().decode()

    merged = merge_expositions([runner("g1-r0", 3), runner("g1-r1", 4)]).decode()
    assert merged.count("# TYPE sluice_records_in_total counter") == 1, merged
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    samples = families["sluice_records_in"].samples
    assert sorted((s.labels["runner"], s.labels["operator"], s.value) for s in samples) == [
        ("g1-r0", "map", 3.0), ("g1-r1", "map", 4.0)
    ]
    assert {s.value for s in families["sluice_backpressure_ratio"].samples} == {0.5}
    assert {s.value for s in families["sluice_watermark_lag_seconds"].samples} == {2.0}


def test_log_reader_tails_and_follows_whole_lines(tmp_path: Path) -> None:
    folder = tmp_path / "runners" / "job-1" / "gen-2"
    folder.mkdir(parents=True)
    (folder / "runner-0.log").write_text("a\nb\nc\n")
    (folder / "runner-1.log").write_text("x\n")
    with pytest.raises(LogsNotFound, match="generations: 2"):
        pick_generation(tmp_path, "job-1", 3)
    assert pick_generation(tmp_path, "job-1", None) == 2
    reader = LogReader(tmp_path, "job-1", 2)
    assert reader.tail(2) == ["[g2-r0] b", "[g2-r0] c", "[g2-r1] x"]
    with open(folder / "runner-0.log", "a") as f:
        f.write("d\npartial")
    assert reader.new_lines() == ["[g2-r0] d"]  # the line still being written waits
    with open(folder / "runner-0.log", "a") as f:
        f.write(" line\n")
    assert reader.new_lines() == ["[g2-r0] partial line"]



async def test_a_second_endpoint_on_the_default_port_takes_a_free_one() -> None:
    """Two workers on one machine both ask for the default port: the second takes a free port
    (and says where); a port the user chose is never replaced silently. (Started at the same
    moment, both could bind the port with SO_REUSEADDR: the endpoint listens right after binding,
    so the loser learns it there, where the fallback is, not later in the server.)"""
    other = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # the other worker's endpoint
    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    other.bind(("127.0.0.1", 0))
    port = other.getsockname()[1]
    other.listen(1)
    second = ObservabilityEndpoint("127.0.0.1", port, port_is_default=True)
    explicit = ObservabilityEndpoint("127.0.0.1", port)
    try:
        await second.start()
        assert second.port != port and second.url.endswith(f":{second.port}")
        with pytest.raises(OSError, match=f"metrics port 127.0.0.1:{port}"):
            await explicit.start()
    finally:
        other.close()
        for endpoint in (second, explicit):
            await endpoint.close()
