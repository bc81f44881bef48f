"""Channels between subtasks: the wire format (pure), LocalChannel, and the TCP pair
RemoteSender -> DataServer/InboundChannel (loopback only; every server and socket opened here is
closed here)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator

import pyarrow as pa
import pytest
import pytest_asyncio

from sluice.auth import runner_token
from sluice.engine.channels import (
    ChannelClosed,
    ChannelId,
    DataServer,
    InboundChannel,
    LocalChannel,
    Receiver,
    RemoteSender,
    Sender,
    secret_authorizer,
    token_authorizer,
)
from sluice.engine.framing import (
    HEADER,
    FrameKind,
    FrameReader,
    FramingError,
    Hello,
    MessageDecoder,
    MessageEncoder,
    decode_error,
    decode_hello,
    decode_messages,
    encode_accept,
    encode_error,
    encode_hello,
    encode_messages,
)
from sluice.engine.messages import Barrier, EndOfStream, Message, Watermark

LOOPBACK = "127.0.0.1"
SECRET = b"test-secret"
JOB = "job-1"
CH = ChannelId("gen->win", 0, 1)
T = 10.0  # upper bound of any single wait in these tests: a bug fails them instead of hanging


def token(gen: int = 1, job: str = JOB) -> str:
    return runner_token(SECRET, job, gen)


def batch(n: int = 5, start: int = 0) -> pa.RecordBatch:
    return pa.record_batch(
        {
            "key": pa.array([f"k{i}" for i in range(start, start + n)], pa.string()),
            "ts": pa.array(range(start, start + n), pa.timestamp("ms")),
            "value": pa.array(range(start, start + n), pa.int64()),
        }
    )


def other_schema_batch() -> pa.RecordBatch:
    b = pa.record_batch({"x": pa.array([1.5, None, 3.0]), "flag": pa.array([True, False, None])})
    return b.replace_schema_metadata({"origin": "test"})


def big_batch(nbytes: int) -> pa.RecordBatch:
    return pa.record_batch({"v": pa.array(range(nbytes // 8), pa.int64())})


def same(a: Message, b: Message) -> bool:
    if isinstance(a, pa.RecordBatch):
        return isinstance(b, pa.RecordBatch) and a.schema.equals(b.schema, check_metadata=True) and a.equals(b)
    return a == b


def sample_stream() -> list[Message]:
    return [
        batch(5),
        Watermark(1_700_000_000_000),
        batch(0),  # empty batch, same schema
        Barrier(epoch=7),
        other_schema_batch(),  # schema change mid-stream
        batch(3, start=10),  # and back
        Barrier(epoch=8, then_stop=True),
        Watermark(-5),
        EndOfStream(),
    ]


# ============================================================================ framing (pure)


def test_round_trip_every_message_kind() -> None:
    msgs = sample_stream()
    out = decode_messages(encode_messages(msgs))
    assert len(out) == len(msgs)
    for a, b in zip(msgs, out):
        assert same(a, b), (a, b)


def test_schema_frame_only_when_schema_changes() -> None:
    kinds: list[int] = []
    enc = MessageEncoder()
    data = b"".join(bytes(b) for m in sample_stream() for b in enc.encode(m))
    reader = FrameReader()
    reader.feed(data)
    while (f := reader.next_frame()) is not None:
        kinds.append(f.kind)
    assert kinds.count(FrameKind.SCHEMA) == 3  # first batch, the change, and back
    assert kinds.count(FrameKind.BATCH) == 4
    assert kinds[0] == FrameKind.SCHEMA and kinds[1] == FrameKind.BATCH


def test_batch_payload_is_written_without_copy() -> None:
    b = big_batch(1 << 20)
    bufs = MessageEncoder().encode(b)
    assert isinstance(bufs[-1], memoryview) and len(bufs[-1]) > 1 << 20
    assert struct.unpack("<BI", bufs[-2]) == (FrameKind.BATCH, len(bufs[-1]))


def test_large_frame_received_in_place_and_decoded_zero_copy() -> None:
    data = encode_messages([big_batch(1 << 20)])
    reader = FrameReader()
    dec = MessageDecoder()
    got: list[Message] = []
    pos = 0
    while pos < len(data):  # what a BufferedProtocol does
        buf = reader.get_buffer()
        n = min(len(buf), len(data) - pos, 100_000)
        buf[:n] = data[pos:pos + n]
        reader.advance(n)
        pos += n
        while (f := reader.next_frame()) is not None:
            if (m := dec.decode(f.kind, f.payload)) is not None:
                got.append(m)
    reader.finish()
    assert len(got) == 1 and got[0].equals(big_batch(1 << 20))


@pytest.mark.parametrize("chunk", [1, 3, 7, 4096, 70_000])
def test_any_chunking_decodes_the_same(chunk: int) -> None:
    msgs = sample_stream()[:-1] + [big_batch(200_000), EndOfStream()]
    data = encode_messages(msgs)
    reader, dec, out = FrameReader(), MessageDecoder(), []
    for i in range(0, len(data), chunk):
        reader.feed(data[i:i + chunk])
        while (f := reader.next_frame()) is not None:
            if (m := dec.decode(f.kind, f.payload)) is not None:
                out.append(m)
    reader.finish()
    assert len(out) == len(msgs) and all(same(a, b) for a, b in zip(msgs, out))


def test_truncated_input_is_a_clear_error() -> None:
    msgs = [batch(5), Watermark(3), Barrier(1), EndOfStream()]
    data = encode_messages(msgs)
    boundaries = {0}
    enc = MessageEncoder()
    pos = 0
    for m in msgs:
        for b in enc.encode(m):
            pos += len(b)
            if not (len(b) == HEADER.size and b[0] in (FrameKind.SCHEMA, FrameKind.BATCH)):
                boundaries.add(pos)
    for cut in range(len(data)):
        if cut in boundaries:
            decode_messages(data[:cut])  # a whole number of frames: fine
            continue
        with pytest.raises(FramingError, match="truncated"):
            decode_messages(data[:cut])


def test_garbage_and_malformed_frames_are_clear_errors() -> None:
    with pytest.raises(FramingError, match="unknown frame kind"):
        decode_messages(b"GET / HTTP/1.1\r\n\r\n")
    # A batch before any schema.
    enc = MessageEncoder()
    bufs = enc.encode(batch())
    with pytest.raises(FramingError, match="before any schema"):
        decode_messages(b"".join(bytes(b) for b in bufs[2:]))
    # Payload that is not Arrow IPC.
    with pytest.raises(FramingError, match="undecodable SCHEMA"):
        decode_messages(HEADER.pack(FrameKind.SCHEMA, 4) + b"oops")
    # Wrong payload sizes and values of control frames.
    with pytest.raises(FramingError, match="WATERMARK frame payload must be 8 bytes"):
        decode_messages(HEADER.pack(FrameKind.WATERMARK, 3) + b"abc")
    with pytest.raises(FramingError, match="then_stop byte"):
        decode_messages(HEADER.pack(FrameKind.BARRIER, 9) + struct.pack("<q", 1) + b"\x07")
    # An oversized length is refused before anything is allocated.
    reader = FrameReader(max_frame_bytes=1000)
    reader.feed(HEADER.pack(FrameKind.BATCH, 1001))
    with pytest.raises(FramingError, match="exceeds the 1000-byte limit"):
        reader.next_frame()
    # Non-data frames in a data stream.
    with pytest.raises(FramingError, match="unexpected frame kind HELLO"):
        MessageDecoder().decode(FrameKind.HELLO, b"{}")


def test_hello_accept_error_round_trip_and_validation() -> None:
    hello = Hello(job_id=JOB, generation=3, token="secret-token", channel=CH)
    frame = encode_hello(hello)
    kind, length = HEADER.unpack_from(frame)
    assert kind == FrameKind.HELLO and length == len(frame) - HEADER.size
    assert decode_hello(frame[HEADER.size:]) == hello
    assert "secret-token" not in repr(hello)
    assert encode_accept() == HEADER.pack(FrameKind.ACCEPT, 0)
    err = encode_error("nope ✗")
    assert decode_error(err[HEADER.size:]) == "nope ✗"
    with pytest.raises(FramingError, match="not valid JSON"):
        decode_hello(b"{")
    with pytest.raises(FramingError, match="lacks channel, generation"):
        decode_hello(b'{"version": 1, "job_id": "j", "token": "t"}')
    with pytest.raises(FramingError, match="generation must be an integer"):
        decode_hello(b'{"version": 1, "job_id": "j", "token": "t", "generation": "1", "channel": {}}')
    with pytest.raises(FramingError, match="channel.sender must be an integer"):
        decode_hello(
            b'{"version": 1, "job_id": "j", "token": "t", "generation": 1,'
            b' "channel": {"edge": "a->b", "sender": -1, "receiver": 0}}'
        )


def test_channel_id_string_form_is_stable() -> None:
    assert str(CH) == "gen->win[0->1]"
    assert ChannelId.parse(str(CH)) == CH
    assert ChannelId.from_dict(CH.to_dict()) == CH
    with pytest.raises(ValueError, match="not a channel id"):
        ChannelId.parse("gen->win")
    assert {CH: 1}[ChannelId("gen->win", 0, 1)] == 1  # hashable, by value


# ============================================================================ LocalChannel


async def test_local_round_trip_is_zero_copy_and_in_order() -> None:
    ch = LocalChannel(capacity=len(sample_stream()), channel=CH)
    msgs = sample_stream()
    for m in msgs:
        await ch.send(m)
    for m in msgs:
        assert await ch.receive() is m
    # Barriers may follow EndOfStream (a finished source keeps answering checkpoints).
    await ch.send(Barrier(epoch=9, then_stop=True))
    assert await ch.receive() == Barrier(epoch=9, then_stop=True)
    await ch.close()
    with pytest.raises(ChannelClosed, match=r"gen->win\[0->1\].*closed after EndOfStream") as ei:
        await ch.receive()
    assert ei.value.after_end
    with pytest.raises(ChannelClosed):
        await ch.send(Watermark(1))


async def test_local_send_blocks_at_capacity() -> None:
    ch = LocalChannel(capacity=2)
    await ch.send(Watermark(1))
    await ch.send(Watermark(2))
    blocked = asyncio.create_task(ch.send(Watermark(3)))
    await asyncio.sleep(0.05)
    assert not blocked.done() and len(ch) == 2
    assert await ch.receive() == Watermark(1)
    await asyncio.wait_for(blocked, T)
    assert [await ch.receive(), await ch.receive()] == [Watermark(2), Watermark(3)]


async def test_local_close_fails_blocked_sender_and_drains_receiver() -> None:
    ch = LocalChannel(capacity=1, channel=CH)
    await ch.send(Watermark(1))
    blocked = asyncio.create_task(ch.send(Watermark(2)))
    await asyncio.sleep(0.01)
    await ch.close()
    with pytest.raises(ChannelClosed, match="closed before EndOfStream"):
        await asyncio.wait_for(blocked, T)
    assert await ch.receive() == Watermark(1)  # what was queued is still delivered
    with pytest.raises(ChannelClosed, match="closed before EndOfStream") as ei:
        await ch.receive()
    assert not ei.value.after_end
    # A receiver blocked on an empty channel is woken by close too.
    ch2 = LocalChannel(capacity=1)
    waiting = asyncio.create_task(ch2.receive())
    await asyncio.sleep(0.01)
    await ch2.close()
    with pytest.raises(ChannelClosed, match="local channel"):
        await asyncio.wait_for(waiting, T)
    with pytest.raises(TypeError):
        await ch2.send("not a message")  # type: ignore[arg-type]


async def test_local_cancelled_waiters_do_not_lose_wakeups() -> None:
    ch = LocalChannel(capacity=1)
    r1 = asyncio.create_task(ch.receive())
    await asyncio.sleep(0)
    r1.cancel()
    r2 = asyncio.create_task(ch.receive())
    await asyncio.sleep(0)
    await ch.send(Watermark(9))
    assert await asyncio.wait_for(r2, T) == Watermark(9)
    # Woken and cancelled before running: the wake-up passes to the next waiter.
    r3 = asyncio.create_task(ch.receive())
    r4 = asyncio.create_task(ch.receive())
    await asyncio.sleep(0)
    await ch.send(Watermark(10))  # wakes r3
    r3.cancel()
    assert await asyncio.wait_for(r4, T) == Watermark(10)


# ============================================================================ TCP


@pytest_asyncio.fixture
async def server() -> AsyncIterator[DataServer]:
    srv = DataServer(secret_authorizer(SECRET), registration_timeout_s=5.0)
    await srv.start(LOOPBACK, 0)
    try:
        yield srv
    finally:
        await srv.close()


@contextlib.asynccontextmanager
async def sender(
    port: int, *, gen: int = 1, tok: str | None = None, channel: ChannelId = CH, **kw: object
) -> AsyncIterator[RemoteSender]:
    s = await RemoteSender.connect(
        LOOPBACK, port, job_id=JOB, generation=gen, token=tok if tok is not None else token(gen), channel=channel, **kw  # type: ignore[arg-type]
    )
    try:
        yield s
    finally:
        await s.close()


async def recv(inbound: Receiver) -> Message:
    return await asyncio.wait_for(inbound.receive(), T)


async def send_until_closed(s: RemoteSender, limit: int = 1000) -> ChannelClosed:
    """Send small messages until the channel reports being closed (it may take a round trip)."""
    for i in range(limit):
        try:
            await asyncio.wait_for(s.send(Watermark(i)), T)
        except ChannelClosed as exc:
            return exc
        await asyncio.sleep(0.01)
    raise AssertionError("send() never raised ChannelClosed")


def test_every_endpoint_presents_the_same_interface() -> None:
    assert isinstance(LocalChannel(1), Sender) and isinstance(LocalChannel(1), Receiver)
    assert issubclass(RemoteSender, Sender) and issubclass(InboundChannel, Receiver)


async def test_tcp_round_trip(server: DataServer) -> None:
    inbound = server.register(JOB, 1, CH, capacity=4)
    msgs = sample_stream()
    async with sender(server.port) as s:
        await asyncio.wait_for(s.wait_accepted(), T)
        assert s.accepted

        async def produce() -> None:
            for m in msgs:
                await s.send(m)

        producing = asyncio.create_task(produce())
        got = [await recv(inbound) for _ in msgs]
        await asyncio.wait_for(producing, T)
        # Barriers may follow EndOfStream.
        await s.send(Barrier(epoch=9, then_stop=True))
        assert await recv(inbound) == Barrier(epoch=9, then_stop=True)
    assert all(same(a, b) for a, b in zip(msgs, got))
    assert inbound.peer.startswith(LOOPBACK)
    # The sender closed after EndOfStream: a clean end.
    with pytest.raises(ChannelClosed, match=r"gen->win\[0->1\].*closed the channel after EndOfStream") as ei:
        await recv(inbound)
    assert ei.value.after_end


async def test_tcp_many_batches_with_large_payloads(server: DataServer) -> None:
    inbound = server.register(JOB, 1, CH, capacity=3)
    sent = [big_batch(300_000 + 8 * i) for i in range(20)]

    async def produce() -> None:
        async with sender(server.port, capacity_bytes=256 * 1024) as s:
            for b in sent:
                await s.send(b)
            await s.send(EndOfStream())

    producing = asyncio.create_task(produce())
    for b in sent:
        assert (await recv(inbound)).equals(b)
    assert isinstance(await recv(inbound), EndOfStream)
    await asyncio.wait_for(producing, T)


async def test_registration_may_come_after_the_connection(server: DataServer) -> None:
    async with sender(server.port) as s:
        await s.send(batch(2))
        await s.send(Watermark(5))
        await asyncio.sleep(0.1)
        assert not s.accepted
        inbound = server.register(JOB, 1, CH)
        await asyncio.wait_for(s.wait_accepted(), T)
        assert (await recv(inbound)).equals(batch(2))
        assert await recv(inbound) == Watermark(5)


async def test_unregistered_channel_is_refused_after_the_timeout() -> None:
    srv = DataServer(secret_authorizer(SECRET), registration_timeout_s=0.2)
    await srv.start(LOOPBACK, 0)
    try:
        async with sender(srv.port) as s:
            with pytest.raises(ChannelClosed, match=r"no receiver registered for gen->win\[0->1\]"):
                await s.wait_accepted(timeout_s=T)
            with pytest.raises(ChannelClosed, match="refused by receiver"):
                await s.send(Watermark(1))
    finally:
        await srv.close()


async def test_bad_token_is_refused_and_the_server_keeps_serving(server: DataServer) -> None:
    inbound = server.register(JOB, 1, CH)
    async with sender(server.port, tok="forged") as bad:
        with pytest.raises(ChannelClosed, match="not authorized for job 'job-1' generation 1") as ei:
            await bad.wait_accepted(timeout_s=T)
        assert str(CH) in str(ei.value) and f"{LOOPBACK}:{server.port}" in str(ei.value)
        exc = await send_until_closed(bad)
        assert "not authorized" in str(exc)
    assert not inbound.connected  # the forged connection never reached the receiver
    async with sender(server.port) as good:
        await good.send(Watermark(1))
        assert await recv(inbound) == Watermark(1)


async def test_token_authorizer_accepts_only_its_generation() -> None:
    auth = token_authorizer(JOB, 2, "tok")
    assert auth(JOB, 2, "tok")
    assert not auth(JOB, 1, "tok") and not auth("other", 2, "tok") and not auth(JOB, 2, "tok2")


async def test_stale_generation_is_refused(server: DataServer) -> None:
    old = server.register(JOB, 1, CH)
    async with sender(server.port, gen=1) as s1:
        await s1.send(Watermark(1))
        assert await recv(old) == Watermark(1)
        # The generation ends: its receivers and senders are closed.
        server.unregister_generation(JOB, 1)
        with pytest.raises(ChannelClosed, match="generation 1 of job 'job-1' was unregistered"):
            await recv(old)
        exc = await send_until_closed(s1)
        assert "unregistered" in str(exc) and str(CH) in str(exc)
    # A late sender of the old generation is refused at once (not after the registration timeout).
    async with sender(server.port, gen=1) as late:
        with pytest.raises(ChannelClosed, match="generation 1 of job 'job-1' is stale"):
            await late.wait_accepted(timeout_s=2.0)
    with pytest.raises(ValueError, match="stale"):
        server.register(JOB, 1, CH)
    # Older than the newest registered generation: stale too.
    new = server.register(JOB, 3, CH)
    async with sender(server.port, gen=2) as s2:
        with pytest.raises(ChannelClosed, match="generation 2 of job 'job-1' is stale"):
            await s2.wait_accepted(timeout_s=2.0)
    async with sender(server.port, gen=3) as s3:
        await s3.send(Watermark(3))
        assert await recv(new) == Watermark(3)


async def test_second_sender_on_a_channel_is_refused(server: DataServer) -> None:
    inbound = server.register(JOB, 1, CH)
    async with sender(server.port) as s1, sender(server.port) as s2:
        await s1.wait_accepted(timeout_s=T)
        with pytest.raises(ChannelClosed, match="already has a sender"):
            await s2.wait_accepted(timeout_s=T)
        await s1.send(Watermark(1))
        assert await recv(inbound) == Watermark(1)
    with pytest.raises(ValueError, match="already registered"):
        server.register(JOB, 1, CH)


async def test_garbage_connection_is_refused_without_harm(server: DataServer) -> None:
    inbound = server.register(JOB, 1, CH)
    reader, writer = await asyncio.open_connection(LOOPBACK, server.port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), T)  # until the server closes
        kind, length = HEADER.unpack_from(data)
        assert kind == FrameKind.ERROR and b"unknown frame kind" in data[HEADER.size:HEADER.size + length]
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    # A hello-sized lie is refused too (cap before authentication).
    reader, writer = await asyncio.open_connection(LOOPBACK, server.port)
    try:
        writer.write(HEADER.pack(FrameKind.HELLO, 1 << 30))
        data = await asyncio.wait_for(reader.read(), T)
        assert b"exceeds the 65536-byte limit" in data
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    async with sender(server.port) as s:
        await s.send(EndOfStream())
        assert isinstance(await recv(inbound), EndOfStream)


async def test_backpressure_bounds_what_send_accepts(server: DataServer) -> None:
    capacity, capacity_bytes, size = 2, 256 * 1024, 1 << 20
    inbound = server.register(JOB, 1, CH, capacity=capacity)
    msg = big_batch(size)
    total = 200  # 200 MiB if nothing pushed back
    accepted = 0
    async with sender(server.port, capacity_bytes=capacity_bytes) as s:

        async def produce() -> None:
            nonlocal accepted
            for _ in range(total):
                await s.send(msg)
                accepted += 1
            await s.send(EndOfStream())

        producing = asyncio.create_task(produce())
        # Wait until the sender is stuck: nothing accepted for a while, although the consumer
        # has not read anything.
        last = -1
        while accepted != last:
            last = accepted
            await asyncio.sleep(0.3)
        assert not producing.done()
        assert len(inbound) == capacity  # the receiver decoded no more than its queue holds
        # Everything accepted is in one of: the receiver's queue, its partly received frame, the
        # two kernel socket buffers, or the sender's transport buffer (high-water + one message).
        assert inbound._conn is not None and inbound._conn._transport is not None
        rcvbuf = inbound._conn._transport.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        sndbuf = s._writer.transport.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        bound = (capacity + 1) * size + rcvbuf + sndbuf + capacity_bytes + size
        print(f"backpressure: accepted {accepted} MiB, bound {bound / 2**20:.1f} MiB")
        assert accepted * size <= bound, (accepted, bound)
        assert accepted < total
        # Reading resumes the sender; all arrive in order.
        for _ in range(total):
            got = await recv(inbound)
            assert isinstance(got, pa.RecordBatch) and got.num_rows == size // 8
        assert isinstance(await recv(inbound), EndOfStream)
        await asyncio.wait_for(producing, T)


async def test_sender_disconnect_without_end_of_stream(server: DataServer) -> None:
    inbound = server.register(JOB, 1, CH)
    async with sender(server.port) as s:
        await s.send(Watermark(1))
        await s.send(batch(3))
    # close() without EndOfStream: what arrived is delivered, then the break is reported.
    assert await recv(inbound) == Watermark(1)
    assert (await recv(inbound)).equals(batch(3))
    with pytest.raises(ChannelClosed) as ei:
        await recv(inbound)
    text = str(ei.value)
    assert "gen->win[0->1]" in text and LOOPBACK in text and "without EndOfStream" in text
    assert ei.value.channel == CH and not ei.value.after_end


async def test_sender_killed_mid_frame(server: DataServer) -> None:
    inbound = server.register(JOB, 1, CH)
    _, writer = await asyncio.open_connection(LOOPBACK, server.port)
    writer.write(encode_hello(Hello(JOB, 1, token(), CH)))
    data = encode_messages([batch(4), big_batch(200_000)])
    writer.write(data[:-1000])  # the second batch cut short
    await writer.drain()
    writer.transport.abort()  # like a killed process
    assert (await recv(inbound)).equals(batch(4))
    with pytest.raises(ChannelClosed, match=r"gen->win\[0->1\].*(mid-frame|connection lost|without EndOfStream)"):
        await recv(inbound)


async def test_receiver_close_fails_the_sender(server: DataServer) -> None:
    inbound = server.register(JOB, 1, CH)
    async with sender(server.port) as s:
        await s.send(Watermark(1))
        assert await recv(inbound) == Watermark(1)
        await inbound.close()
        exc = await send_until_closed(s)
        assert "gen->win[0->1]" in str(exc) and "receiver closed the channel" in str(exc)
        assert f"{LOOPBACK}:{server.port}" in str(exc)
    with pytest.raises(ChannelClosed, match="receiver closed the channel"):
        await recv(inbound)


async def test_receiver_not_reading_then_server_closed_unblocks_sender() -> None:
    srv = DataServer(secret_authorizer(SECRET))
    await srv.start(LOOPBACK, 0)
    try:
        srv.register(JOB, 1, CH, capacity=1)
        async with sender(srv.port, capacity_bytes=64 * 1024) as s:

            async def produce() -> None:
                while True:
                    await s.send(big_batch(1 << 20))

            producing = asyncio.create_task(produce())
            await asyncio.sleep(0.3)
            assert not producing.done()  # blocked by backpressure
            await srv.close()
            with pytest.raises(ChannelClosed, match="gen->win"):
                await asyncio.wait_for(producing, T)
    finally:
        await srv.close()


async def test_connect_retries_until_the_peer_listens() -> None:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        port = probe.getsockname()[1]
    srv = DataServer(secret_authorizer(SECRET))
    connecting = asyncio.create_task(
        RemoteSender.connect(LOOPBACK, port, job_id=JOB, generation=1, token=token(), channel=CH, connect_timeout_s=T)
    )
    try:
        await asyncio.sleep(0.3)
        assert not connecting.done()
        await srv.start(LOOPBACK, port)
        inbound = srv.register(JOB, 1, CH)
        s = await asyncio.wait_for(connecting, T)
        try:
            await s.send(Watermark(42))
            assert await recv(inbound) == Watermark(42)
        finally:
            await s.close()
    finally:
        connecting.cancel()
        await srv.close()


async def test_connect_gives_up_with_a_clear_error() -> None:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        port = probe.getsockname()[1]
    with pytest.raises(ChannelClosed) as ei:
        await RemoteSender.connect(
            LOOPBACK, port, job_id=JOB, generation=1, token=token(), channel=CH, connect_timeout_s=0.3
        )
    text = str(ei.value)
    assert f"{LOOPBACK}:{port}" in text and "gen->win[0->1]" in text and "could not connect within 0.3 s" in text


async def test_inbound_connect_timeout(server: DataServer) -> None:
    inbound = server.register(JOB, 1, CH, connect_timeout_s=0.1)
    with pytest.raises(ChannelClosed, match="no sender connected within 0.1 s"):
        await recv(inbound)


async def test_send_after_close(server: DataServer) -> None:
    inbound = server.register(JOB, 1, CH)
    s = await RemoteSender.connect(LOOPBACK, server.port, job_id=JOB, generation=1, token=token(), channel=CH)
    await s.send(EndOfStream())
    await s.close()
    await s.close()  # idempotent
    with pytest.raises(ChannelClosed, match="send after close"):
        await s.send(Watermark(1))
    assert isinstance(await recv(inbound), EndOfStream)
    with pytest.raises(ChannelClosed) as ei:
        await recv(inbound)
    assert ei.value.after_end
