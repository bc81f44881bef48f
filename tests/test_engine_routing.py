"""Input gate and output routing over in-process channels: alignment, watermarks, partitioning."""

from __future__ import annotations

import asyncio

import numpy as np
import pyarrow as pa
import pytest

from sluice.engine.channels import LocalChannel
from sluice.engine.keys import key_hashes, owners
from sluice.engine.messages import Barrier, EndOfStream, Idle, Watermark
from sluice.engine.routing import InputChannel, InputClosed, InputGate, Output
from sluice.models import Edge


def _batch(*values: int) -> pa.RecordBatch:
    return pa.record_batch({"key": pa.array([f"k{v}" for v in values]), "v": pa.array(list(values))})


async def _gate(n: int) -> tuple[InputGate, list[LocalChannel]]:
    chans = [LocalChannel(16) for _ in range(n)]
    gate = InputGate([InputChannel(f"c{i}", ch) for i, ch in enumerate(chans)])
    gate.start()
    return gate, chans


async def _next(gate: InputGate) -> object:
    return await asyncio.wait_for(gate.next(), 2)


async def test_barrier_waits_for_every_input_and_holds_the_aligned_channel() -> None:
    gate, (a, b) = await _gate(2)
    await a.send(Barrier(1))
    await a.send(_batch(1))  # after the barrier on a: must not pass before the barrier
    await b.send(_batch(2))
    got = await _next(gate)
    assert isinstance(got, pa.RecordBatch) and got.column("v").to_pylist() == [2]
    await b.send(Barrier(1))
    assert await _next(gate) == Barrier(1)
    got = await _next(gate)
    assert isinstance(got, pa.RecordBatch) and got.column("v").to_pylist() == [1]
    await gate.close()


async def test_watermark_is_the_minimum_and_end_of_stream_releases_it() -> None:
    gate, (a, b) = await _gate(2)
    await a.send(Watermark(100))
    await b.send(Watermark(50))
    assert await _next(gate) == Watermark(50)
    await b.send(Watermark(80))
    assert await _next(gate) == Watermark(80)
    await b.send(EndOfStream())  # b no longer holds the watermark back
    assert await _next(gate) == Watermark(100)
    await a.send(EndOfStream())
    assert await _next(gate) == EndOfStream()
    # barriers still come after the end of stream (bounded sources keep answering checkpoints)
    await a.send(Barrier(3, then_stop=True))
    await b.send(Barrier(3, then_stop=True))
    assert await _next(gate) == Barrier(3, then_stop=True)
    await gate.close()


async def test_close_before_end_of_stream_is_an_error_naming_the_channel() -> None:
    gate, (a, b) = await _gate(2)
    await a.close()
    with pytest.raises(InputClosed, match="c0 closed before end of stream"):
        await _next(gate)
    await gate.close()


async def test_all_closed_after_end_of_stream_ends_the_gate() -> None:
    gate, (a,) = await _gate(1)
    await a.send(EndOfStream())
    await a.close()
    assert await _next(gate) == EndOfStream()
    assert await _next(gate) is None
    await gate.close()


async def test_hash_output_sends_each_key_to_its_owner() -> None:
    outs = [LocalChannel(16) for _ in range(3)]
    output = Output(Edge(from_op="k", to_op="w", kind="hash", key=["key"]), outs)
    batch = _batch(*range(100))
    await output.emit(batch)
    want = owners(key_hashes(batch, ["key"]), 3)
    seen = 0
    for i, ch in enumerate(outs):
        if len(ch):
            part = await ch.receive()
            assert isinstance(part, pa.RecordBatch)
            vals = np.array(part.column("v").to_pylist())
            assert (want[vals] == i).all()
            seen += part.num_rows
    assert seen == 100
    await output.broadcast(Watermark(5))
    for ch in outs:
        while len(ch) > 1:
            await ch.receive()
        assert await ch.receive() == Watermark(5)


async def test_rebalance_output_deals_batches_round_robin() -> None:
    outs = [LocalChannel(16) for _ in range(2)]
    output = Output(Edge(from_op="a", to_op="b", kind="rebalance"), outs)
    for v in range(4):
        await output.emit(_batch(v))
    assert [len(ch) for ch in outs] == [2, 2]


async def test_idle_channel_does_not_hold_the_watermark_until_it_sends_again() -> None:
    gate, (a, b) = await _gate(2)
    await a.send(Watermark(100))
    await b.send(Idle())
    assert await _next(gate) == Watermark(100)
    await a.send(Idle())
    assert await _next(gate) == Idle()  # every channel idle: downstream learns it once
    await b.send(Watermark(150))  # b active again
    assert await _next(gate) == Watermark(150)
    await a.send(_batch(1))  # a active again: its watermark counts again
    await a.send(Watermark(120))  # below what was emitted (150): no step back
    await b.send(Watermark(300))  # the minimum is a's 120: nothing to emit
    await a.send(Watermark(400))
    got = await _next(gate)
    assert isinstance(got, pa.RecordBatch)
    assert await _next(gate) == Watermark(300)
    await gate.close()


def test_idle_frame_round_trip() -> None:
    from sluice.engine.framing import FrameReader, MessageDecoder, MessageEncoder

    frames = MessageEncoder().encode(Idle())
    reader = FrameReader()
    reader.feed(b"".join(bytes(f) for f in frames))
    frame = reader.next_frame()
    assert frame is not None and MessageDecoder().decode(frame.kind, frame.payload) == Idle()
