"""Channels between subtasks: an ordered, bounded stream of messages from one sender subtask to one
receiver subtask, in the same event loop (:class:`LocalChannel`) or over TCP (:class:`RemoteSender`
on the upstream runner, :class:`InboundChannel` from the downstream runner's :class:`DataServer`).

Task code only sees two small interfaces, whatever the transport:

* :class:`Sender`: ``await send(msg)`` (blocks while the channel is full), ``await close()``;
* :class:`Receiver`: ``await receive() -> Message`` (blocks while it is empty), ``await close()``.

Guarantees (docs/channels.md has the full contract):

* Order: messages arrive exactly in the order sent; batches arrive with their schema, zero-copy on
  the receiving side (columns point into the one buffer the payload was received into).
* Bounded memory: a local channel holds at most ``capacity`` messages; a remote channel holds at
  most ``capacity_bytes`` (+ one message) in the sender's user-space buffer, the kernel's socket
  buffers, one partial frame, and ``capacity`` decoded messages at the receiver. The receiver reads
  the socket only while its queue has room, so a slow consumer blocks the sender's ``send()``.
* End: ``EndOfStream`` is an ordinary message (barriers may follow it, until one says
  ``then_stop``); the channel ends when the sender closes it. Then, after every message that
  arrived, ``receive()`` raises :class:`ChannelClosed`, whose ``after_end`` says whether
  EndOfStream came first (a clean end) or not (a broken stream: the peer went away).
* No silent loss and no hang on failure: a peer that goes away makes ``receive()`` and ``send()``
  raise :class:`ChannelClosed` naming the channel, the peer and the reason.
* Fencing: a connection is accepted only for a registered channel of a live generation, with a
  token the ``authorize`` callable accepts; anything else is refused with an error frame and a log
  line, and never disturbs the server or other channels.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from collections import deque
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import pyarrow as pa

from sluice.auth import runner_token, tokens_equal
from sluice.engine.framing import (
    MAX_FRAME_BYTES,
    MAX_HELLO_BYTES,
    PROTOCOL_VERSION,
    ChannelId,
    FrameKind,
    FrameReader,
    FramingError,
    Hello,
    MessageDecoder,
    MessageEncoder,
    decode_error,
    decode_hello,
    encode_accept,
    encode_error,
    encode_hello,
)
from sluice.engine.messages import Barrier, EndOfStream, Idle, Message, Watermark
from sluice.engine.taskmetrics import BlockedClock

__all__ = [
    "Authorizer",
    "ChannelClosed",
    "ChannelId",
    "DataServer",
    "InboundChannel",
    "LocalChannel",
    "Receiver",
    "RemoteSender",
    "Sender",
    "secret_authorizer",
    "token_authorizer",
]

log = logging.getLogger("sluice.channels")

DEFAULT_CAPACITY = 8
"""Messages a channel's receiving queue holds before the sender blocks."""
DEFAULT_CAPACITY_BYTES = 4 * 1024 * 1024
"""High-water mark of a remote sender's user-space write buffer (`send()` blocks above it)."""
REGISTRATION_TIMEOUT_S = 30.0
"""How long an authenticated connection waits for its receiver to be registered."""
HELLO_TIMEOUT_S = 10.0
"""A connection that has not sent a complete hello by then is dropped."""
CONNECT_TIMEOUT_S = 30.0
"""How long `RemoteSender.connect` retries a peer that is not listening yet."""
CLOSE_TIMEOUT_S = 30.0
"""How long `RemoteSender.close` waits for buffered bytes to reach the kernel before aborting."""

# Dead-peer detection. A peer process that dies gets its sockets closed by the kernel (we see
# EOF/RST at once); these bound the other case, a peer host that vanishes: keepalive probes an
# idle connection, and TCP_USER_TIMEOUT drops one whose sent data stays unacknowledged. A live but
# slow receiver keeps acknowledging zero-window probes, so backpressure never trips it.
_KEEPALIVE_IDLE_S = 10
_KEEPALIVE_INTERVAL_S = 5
_KEEPALIVE_COUNT = 3
_USER_TIMEOUT_MS = 60_000

_MESSAGE_TYPES = (pa.RecordBatch, Barrier, Watermark, Idle, EndOfStream)
# Frames up to this size are joined with their header into one write (one syscall, one segment).
_COALESCE_BYTES = 64 * 1024

Authorizer = Callable[[str, int, str], bool]
"""``authorize(job_id, generation, token) -> bool``: may this peer open a channel of that job
generation? Called once per connection, before anything else about the job is revealed."""


def secret_authorizer(secret: bytes) -> Authorizer:
    """Accept a token iff it is :func:`sluice.auth.runner_token` of the hello's job and generation."""

    def authorize(job_id: str, generation: int, token: str) -> bool:
        return tokens_equal(token, runner_token(secret, job_id, generation))

    return authorize


def token_authorizer(job_id: str, generation: int, token: str) -> Authorizer:
    """Accept only this one job generation's token (what a runner process holds)."""

    def authorize(j: str, g: int, t: str) -> bool:
        # Compare the token even on a job/generation mismatch: constant work either way.
        ok = tokens_equal(t, token)
        return ok and j == job_id and g == generation

    return authorize


class ChannelClosed(Exception):
    """The channel cannot carry messages any more: the peer closed it or went away, refused the
    connection, or this side closed it. ``str()`` names the channel and the peer.

    ``after_end`` tells a clean end from a broken stream: True when EndOfStream had gone through
    the channel before it closed (what a finished upstream does), False when it had not.
    """

    def __init__(self, channel: ChannelId | None, peer: str, reason: str, *, after_end: bool = False) -> None:
        self.channel = channel
        self.peer = peer
        self.reason = reason
        self.after_end = after_end
        what = f"channel {channel}" if channel is not None else "local channel"
        super().__init__(f"{what} (peer {peer}): {reason}")


@runtime_checkable
class Sender(Protocol):
    """The sending end of a channel."""

    async def send(self, msg: Message) -> None:
        """Enqueue `msg`; blocks while the channel is full. Raises ChannelClosed if the channel
        is closed or the peer is gone. Messages may follow EndOfStream (barriers do)."""
        ...

    async def close(self) -> None:
        """Release the channel; idempotent, never raises. Send EndOfStream first for a clean end."""
        ...


@runtime_checkable
class Receiver(Protocol):
    """The receiving end of a channel."""

    async def receive(self) -> Message:
        """The next message; blocks while none is queued. Once the sender closed the channel (or
        went away) and every message sent was received, raises ChannelClosed (``after_end``
        says whether EndOfStream came first)."""
        ...

    async def close(self) -> None:
        """Stop receiving; the sender's next sends fail with ChannelClosed. Idempotent."""
        ...


# --------------------------------------------------------------------------------------------
# The bounded queue behind both LocalChannel and InboundChannel


class _MessageQueue:
    """FIFO of messages with capacity, close-with-error, and a hook run after each take.

    After :meth:`close`, queued messages are still delivered; then `get` raises the close error.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._items: deque[Message] = deque()
        self._getters: deque[asyncio.Future[None]] = deque()
        self._putters: deque[asyncio.Future[None]] = deque()
        self.error: ChannelClosed | None = None
        self.on_take: Callable[[], None] | None = None

    def __len__(self) -> int:
        return len(self._items)

    def full(self) -> bool:
        return len(self._items) >= self.capacity

    @staticmethod
    def _wake(waiters: deque[asyncio.Future[None]], all_: bool = False) -> None:
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                if not all_:
                    return

    @staticmethod
    async def _wait(waiters: deque[asyncio.Future[None]]) -> None:
        fut = asyncio.get_running_loop().create_future()
        waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # Woken, but cancelled before acting on it: pass the wake-up on, or another
                # waiter would sleep with a message (or free slot) available.
                _MessageQueue._wake(waiters)
            raise
        finally:
            try:
                waiters.remove(fut)
            except ValueError:
                pass

    def put_nowait(self, msg: Message) -> None:
        """Append regardless of capacity: the caller enforces the bound (the socket reader checks
        full() before decoding the next frame)."""
        self._items.append(msg)
        self._wake(self._getters)

    async def put(self, msg: Message, blocked: BlockedClock | None = None) -> None:
        """Append `msg`, waiting while the queue is full; `blocked` (the sender's) times that wait."""
        while True:
            if self.error is not None:
                raise self.error
            if not self.full():
                break
            if blocked is None:
                await self._wait(self._putters)
                continue
            blocked.start()  # only a full queue costs a clock read: the hot path stays free
            try:
                await self._wait(self._putters)
            finally:
                blocked.stop()
        self.put_nowait(msg)

    async def get(self) -> Message:
        while not self._items:
            if self.error is not None:
                raise self.error
            await self._wait(self._getters)
        msg = self._items.popleft()
        self._wake(self._putters)
        if self.on_take is not None:
            self.on_take()
        return msg

    def close(self, error: ChannelClosed) -> None:
        if self.error is None:
            self.error = error
        self._wake(self._getters, all_=True)
        self._wake(self._putters, all_=True)


# --------------------------------------------------------------------------------------------
# In-process


class LocalChannel:
    """A channel between two subtasks of the same event loop: messages are passed by reference
    (zero-copy); ``send`` blocks while ``capacity`` messages are queued.

    The one object is both ends: the upstream task calls ``send``, the downstream ``receive``.
    ``close()`` from either end fails pending and later sends; the receiver still gets what was
    queued, then ChannelClosed.
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY, channel: ChannelId | None = None) -> None:
        self.channel = channel
        self.peer = "local"
        self._queue = _MessageQueue(capacity)
        self._sent_end = False
        #: time the sending subtask spent waiting for room (its backpressure)
        self.blocked = BlockedClock()

    @property
    def capacity(self) -> int:
        return self._queue.capacity

    def __len__(self) -> int:
        """Messages queued now."""
        return len(self._queue)

    async def send(self, msg: Message) -> None:
        if not isinstance(msg, _MESSAGE_TYPES):
            raise TypeError(f"not a channel message: {type(msg).__name__}")
        await self._queue.put(msg, self.blocked)
        if isinstance(msg, EndOfStream):
            self._sent_end = True

    async def receive(self) -> Message:
        return await self._queue.get()

    async def close(self) -> None:
        reason = "channel closed after EndOfStream" if self._sent_end else "channel closed before EndOfStream"
        self._queue.close(ChannelClosed(self.channel, self.peer, reason, after_end=self._sent_end))


# --------------------------------------------------------------------------------------------
# TCP: receiving side


def _tune_socket(sock: socket.socket | None) -> None:
    """Low latency (no Nagle: a watermark or barrier must not wait for more data) and dead-peer
    detection (see the constants above)."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    opts = [
        (socket.IPPROTO_TCP, "TCP_NODELAY", 1),
        (socket.SOL_SOCKET, "SO_KEEPALIVE", 1),
        (socket.IPPROTO_TCP, "TCP_KEEPIDLE", _KEEPALIVE_IDLE_S),
        (socket.IPPROTO_TCP, "TCP_KEEPINTVL", _KEEPALIVE_INTERVAL_S),
        (socket.IPPROTO_TCP, "TCP_KEEPCNT", _KEEPALIVE_COUNT),
        (socket.IPPROTO_TCP, "TCP_USER_TIMEOUT", _USER_TIMEOUT_MS),
    ]
    for level, name, value in opts:
        opt = getattr(socket, name, None)
        if opt is None:
            continue  # not on this platform
        try:
            sock.setsockopt(level, opt, value)
        except OSError:
            pass


def _peer_name(transport: asyncio.BaseTransport) -> str:
    addr = transport.get_extra_info("peername")
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return str(addr)


class InboundChannel:
    """The receiving end of a remote channel, made by :meth:`DataServer.register`.

    It exists before its sender connects (messages then simply have not arrived yet) and accepts
    exactly one connection. ``receive()`` returns messages in order and raises ChannelClosed once
    the sender closed the connection (``after_end`` True if EndOfStream came before) or went away,
    the generation was unregistered, the server closed, or (with ``connect_timeout_s``) no sender
    came in time.
    """

    def __init__(
        self,
        server: DataServer,
        job_id: str,
        generation: int,
        channel: ChannelId,
        capacity: int,
        connect_timeout_s: float | None,
    ) -> None:
        self.job_id = job_id
        self.generation = generation
        self.channel = channel
        self.peer = "(not connected)"
        self._server = server
        self._queue = _MessageQueue(capacity)
        self._saw_end = False  # EndOfStream was decoded from the connection
        self._conn: _InboundConnection | None = None
        self._closed = False
        self._timer: asyncio.TimerHandle | None = None
        if connect_timeout_s is not None:
            self._timer = asyncio.get_running_loop().call_later(
                connect_timeout_s,
                self._fail,
                f"no sender connected within {connect_timeout_s:g} s",
            )

    @property
    def capacity(self) -> int:
        return self._queue.capacity

    @property
    def connected(self) -> bool:
        """Whether a sender has been accepted on this channel (it may have gone since)."""
        return self._conn is not None

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        """Decoded messages queued now."""
        return len(self._queue)

    async def receive(self) -> Message:
        return await self._queue.get()

    async def close(self) -> None:
        """The consumer is done: drop the connection (the sender's sends fail) and queued messages."""
        self._fail("receiver closed the channel")

    # -- internal (server and connection) -------------------------------------------------------

    def _attach(self, conn: _InboundConnection) -> None:
        self._conn = conn
        self.peer = conn.peer
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queue.on_take = conn.pump

    def _ended_by_peer(self, reason: str) -> None:
        """The connection is over; messages already queued stay receivable."""
        self._closed = True
        self._queue.close(ChannelClosed(self.channel, self.peer, reason, after_end=self._saw_end))

    def _fail(self, reason: str) -> None:
        """Close from this side: refuse/close the connection with `reason`, end the queue."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._closed = True
        self._queue.close(ChannelClosed(self.channel, self.peer, reason, after_end=self._saw_end))
        if self._conn is not None:
            self._conn.refuse(reason, level=logging.DEBUG)


class _InboundConnection(asyncio.BufferedProtocol):
    """One accepted TCP connection: hello, then frames decoded into its InboundChannel's queue.

    States: "hello" (reading the hello frame), "waiting" (hello read, reading paused while the
    server authorizes and finds the receiver), "streaming", "closed".
    """

    def __init__(self, server: DataServer) -> None:
        self._server = server
        self._reader = FrameReader(max_frame_bytes=MAX_HELLO_BYTES)
        self._decoder = MessageDecoder()
        self._transport: asyncio.Transport | None = None
        self._state = "hello"
        self._paused = False
        self._gone: str | None = None  # why the peer's side ended (EOF or connection lost)
        self._hello: Hello | None = None
        self._inbound: InboundChannel | None = None
        self._hello_timer: asyncio.TimerHandle | None = None
        self._attach_task: asyncio.Task[None] | None = None
        self.peer = "?"

    def __str__(self) -> str:
        ch = f" channel {self._hello.channel}" if self._hello else ""
        return f"data connection from {self.peer}{ch}"

    # -- asyncio protocol callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self.peer = _peer_name(transport)
        _tune_socket(transport.get_extra_info("socket"))
        self._server._connections.add(self)
        self._hello_timer = asyncio.get_running_loop().call_later(
            self._server.hello_timeout_s, self.refuse, f"no hello within {self._server.hello_timeout_s:g} s"
        )

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._reader.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self._reader.advance(nbytes)
        self.pump()

    def eof_received(self) -> bool | None:
        self._peer_gone("peer disconnected without EndOfStream")
        return None  # let the transport close: we never write after the peer's EOF

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._connections.discard(self)
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        if self._attach_task is not None and not self._attach_task.done():
            self._attach_task.cancel()
        reason = "peer disconnected without EndOfStream"
        if exc is not None:
            reason = f"connection lost without EndOfStream: {exc}"
        self._peer_gone(reason)

    # -- frame processing -------------------------------------------------------------------------

    def pump(self) -> None:
        """Decode complete frames while the receiver's queue has room; pause or resume reading
        accordingly. Runs on new bytes and after every message the consumer takes."""
        try:
            while True:
                if self._state == "hello":
                    frame = self._reader.next_frame()
                    if frame is None:
                        break
                    if frame.kind != FrameKind.HELLO:
                        self.refuse(f"expected a hello frame first, got {frame.kind.name}")
                        return
                    self._on_hello(decode_hello(frame.payload))
                    return
                if self._state != "streaming":
                    return
                assert self._inbound is not None
                queue = self._inbound._queue
                if queue.error is not None:
                    return  # the receiver closed; refuse() is under way
                if queue.full():
                    self._pause()
                    return
                frame = self._reader.next_frame()
                if frame is None:
                    break
                msg = self._decoder.decode(frame.kind, frame.payload)
                if msg is not None:
                    if isinstance(msg, EndOfStream):
                        self._inbound._saw_end = True
                    queue.put_nowait(msg)
        except FramingError as exc:
            self.refuse(f"bad data from peer: {exc}")
            return
        except Exception as exc:  # a bug must cost this connection only, never the server
            log.exception("%s: decoding failed", self)
            self.refuse(f"internal error while decoding: {exc}")
            return
        # Every complete frame has been taken.
        if self._gone is not None:
            self._finish()
        elif self._state == "streaming":
            self._resume()

    def _pause(self) -> None:
        if not self._paused and self._transport is not None and not self._transport.is_closing():
            self._paused = True
            self._transport.pause_reading()

    def _resume(self) -> None:
        if self._paused and self._transport is not None and not self._transport.is_closing():
            self._paused = False
            self._transport.resume_reading()

    def _on_hello(self, hello: Hello) -> None:
        self._hello = hello
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        self._state = "waiting"
        # Nothing is read until we know where it goes (and that the peer may send it).
        self._pause()
        self._attach_task = asyncio.get_running_loop().create_task(
            self._server._attach(self, hello), name=f"sluice-channel-attach {hello.channel}"
        )

    def attached(self, inbound: InboundChannel) -> None:
        """The server accepted the hello for `inbound`: acknowledge and start streaming."""
        if self._state != "waiting" or self._transport is None or self._transport.is_closing():
            return  # the peer left (or was refused) meanwhile; the receiver stays unconnected
        self._inbound = inbound
        inbound._attach(self)
        self._reader.max_frame_bytes = MAX_FRAME_BYTES
        self._state = "streaming"
        self._transport.write(encode_accept())
        log.debug("%s accepted", self)
        self.pump()

    def _peer_gone(self, reason: str) -> None:
        if self._gone is not None:
            return
        self._gone = reason
        if self._state == "streaming":
            self.pump()  # deliver complete frames still buffered, then _finish()
        elif self._state in ("hello", "waiting"):
            self._state = "closed"
            if self._attach_task is not None and not self._attach_task.done():
                self._attach_task.cancel()
            log.info("%s: peer left before being accepted", self)

    def _finish(self) -> None:
        """The peer's side ended and every complete frame was delivered: end the queue."""
        if self._state != "streaming":
            return
        self._state = "closed"
        assert self._inbound is not None
        saw_end = self._inbound._saw_end
        try:
            self._reader.finish()
            reason = "sender closed the channel after EndOfStream" if saw_end else (self._gone or "peer disconnected")
        except FramingError as exc:
            reason = f"peer disconnected mid-frame: {exc}"
        if not saw_end:
            log.warning("%s: %s", self, reason)
        self._inbound._ended_by_peer(reason)

    def refuse(self, reason: str, level: int = logging.WARNING) -> None:
        """Close the connection from this side, telling the peer why (error frame)."""
        if self._state == "closed" and (self._transport is None or self._transport.is_closing()):
            return
        prev, self._state = self._state, "closed"
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        log.log(level, "%s refused/closed: %s", self, reason)
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(encode_error(reason))
            self._transport.close()
        if self._inbound is not None and prev == "streaming" and self._inbound._queue.error is None:
            self._inbound._ended_by_peer(reason)


class DataServer:
    """The TCP endpoint of one runner process for all channels whose receiver runs there.

    ``register()`` a receiver per inbound channel (before or shortly after its sender connects),
    ``unregister_generation()`` when a generation is over. A connection must open with a hello
    whose token ``authorize`` accepts, for a registered channel of a live generation; it is
    refused otherwise (error frame to the peer, a log line here). Stale generations are those
    unregistered, or older than the newest one registered for the job.
    """

    def __init__(
        self,
        authorize: Authorizer,
        *,
        registration_timeout_s: float = REGISTRATION_TIMEOUT_S,
        hello_timeout_s: float = HELLO_TIMEOUT_S,
    ) -> None:
        self._authorize = authorize
        self.registration_timeout_s = registration_timeout_s
        self.hello_timeout_s = hello_timeout_s
        self._server: asyncio.Server | None = None
        self._inbound: dict[tuple[str, int, ChannelId], InboundChannel] = {}
        self._connections: set[_InboundConnection] = set()
        self._retired: dict[str, int] = {}  # job -> highest unregistered generation
        self._newest: dict[str, int] = {}  # job -> highest registered generation
        self._changed = asyncio.Event()
        self._closed = False
        self.host = ""
        self.port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on (host, port); port 0 picks a free one, then readable as ``.port``."""
        if self._server is not None:
            raise RuntimeError("DataServer already started")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _InboundConnection(self), host, port)
        sock = self._server.sockets[0]
        self.host, self.port = sock.getsockname()[:2]
        log.info("data server listening on %s:%d", self.host, self.port)

    def register(
        self,
        job_id: str,
        generation: int,
        channel: ChannelId,
        capacity: int = DEFAULT_CAPACITY,
        *,
        connect_timeout_s: float | None = None,
    ) -> InboundChannel:
        """The receiving end of `channel` for this job generation. Raises ValueError if it is
        already registered or the generation is stale. With `connect_timeout_s`, `receive()` raises
        ChannelClosed if no sender connected by then (default: the controller's failure detection
        bounds the wait)."""
        if self._closed:
            raise RuntimeError("DataServer is closed")
        if self._is_stale(job_id, generation):
            raise ValueError(f"cannot register {channel}: generation {generation} of job {job_id!r} is stale")
        key = (job_id, generation, channel)
        if key in self._inbound:
            raise ValueError(f"channel {channel} of job {job_id!r} generation {generation} is already registered")
        inbound = InboundChannel(self, job_id, generation, channel, capacity, connect_timeout_s)
        self._inbound[key] = inbound
        self._newest[job_id] = max(generation, self._newest.get(job_id, generation))
        self._notify()
        return inbound

    def unregister_generation(self, job_id: str, generation: int) -> None:
        """Close every channel of `job_id` up to `generation` (their receivers get ChannelClosed,
        their senders an error frame) and refuse any later connection for them."""
        self._retired[job_id] = max(generation, self._retired.get(job_id, generation))
        for key in [k for k in self._inbound if k[0] == job_id and k[1] <= generation]:
            self._inbound.pop(key)._fail(f"generation {key[1]} of job {job_id!r} was unregistered")
        self._notify()

    async def close(self) -> None:
        """Stop listening and close every channel and connection; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()
        tasks = [c._attach_task for c in self._connections if c._attach_task is not None]
        for inbound in list(self._inbound.values()):
            inbound._fail("data server closed")
        self._inbound.clear()
        for conn in list(self._connections):
            conn.refuse("data server closed", level=logging.DEBUG)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        self._notify()

    # -- internal -------------------------------------------------------------------------------

    def _notify(self) -> None:
        # Wake every connection waiting for a registration; each re-checks its own case.
        self._changed.set()
        self._changed = asyncio.Event()

    def _is_stale(self, job_id: str, generation: int) -> bool:
        return generation <= self._retired.get(job_id, -1) or generation < self._newest.get(job_id, generation)

    async def _attach(self, conn: _InboundConnection, hello: Hello) -> None:
        try:
            await self._attach_checked(conn, hello)
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # a bug here must cost this connection only, never the server
            log.exception("accepting %s failed", conn)
            conn.refuse(f"internal error: {exc}")

    async def _attach_checked(self, conn: _InboundConnection, hello: Hello) -> None:
        if hello.version != PROTOCOL_VERSION:
            conn.refuse(f"protocol version {hello.version} not supported (this receiver speaks {PROTOCOL_VERSION})")
            return
        try:
            allowed = bool(self._authorize(hello.job_id, hello.generation, hello.token))
        except Exception:
            log.exception("authorize() raised for %s", conn)
            allowed = False
        if not allowed:
            conn.refuse(f"not authorized for job {hello.job_id!r} generation {hello.generation} (bad token)")
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.registration_timeout_s
        key = (hello.job_id, hello.generation, hello.channel)
        while True:
            changed = self._changed
            if self._closed:
                conn.refuse("data server closed")
                return
            inbound = self._inbound.get(key)
            if inbound is not None:
                if inbound.closed:
                    conn.refuse(f"the receiver of {hello.channel} already closed it")
                elif inbound.connected:
                    conn.refuse(f"channel {hello.channel} already has a sender")
                else:
                    conn.attached(inbound)
                return
            if self._is_stale(hello.job_id, hello.generation):
                newest = max(self._retired.get(hello.job_id, -1) + 1, self._newest.get(hello.job_id, -1))
                conn.refuse(
                    f"generation {hello.generation} of job {hello.job_id!r} is stale (current: {newest})"
                )
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                conn.refuse(
                    f"no receiver registered for {hello.channel} of job {hello.job_id!r} "
                    f"generation {hello.generation} within {self.registration_timeout_s:g} s"
                )
                return
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                pass


# --------------------------------------------------------------------------------------------
# TCP: sending side


class RemoteSender:
    """The sending end of a remote channel: one TCP connection to the receiver's DataServer.

    Make one with :meth:`connect`. ``send()`` writes the message's frames and waits while more
    than ``capacity_bytes`` are buffered, so memory stays bounded and a slow receiver slows the
    sender. A refusal or disconnect by the receiver makes the next ``send()`` raise ChannelClosed
    with the receiver's reason.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        channel: ChannelId,
        peer: str,
    ) -> None:
        # Use connect(); this only wires an already open connection.
        self.channel = channel
        self.peer = peer
        self._reader = reader
        self._writer = writer
        self._encoder = MessageEncoder()
        self._failure: ChannelClosed | None = None
        self._accepted = False
        self._state_changed = asyncio.Event()
        self._closing = False
        self._sent_end = False
        #: time the sending subtask spent waiting for the receiver (its backpressure)
        self.blocked = BlockedClock()
        self._watcher = asyncio.get_running_loop().create_task(
            self._watch(), name=f"sluice-channel-watch {channel}"
        )

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        job_id: str,
        generation: int,
        token: str,
        channel: ChannelId,
        capacity_bytes: int = DEFAULT_CAPACITY_BYTES,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> RemoteSender:
        """Connect to the DataServer at (host, port) and send the hello.

        Retries (with backoff) while the peer is not listening yet, for up to `connect_timeout_s`;
        then raises ChannelClosed naming the address and the channel. Returns once the hello is
        written: it does not wait for the receiver to be registered (see :meth:`wait_accepted`),
        so two runners can connect to each other in any order.
        """
        if capacity_bytes < 1:
            raise ValueError(f"capacity_bytes must be >= 1, got {capacity_bytes}")
        peer = f"{host}:{port}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + connect_timeout_s
        delay = 0.05
        while True:
            remaining = deadline - loop.time()
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), max(remaining, 0.001))
                break
            except (TimeoutError, OSError) as exc:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    detail = str(exc) or type(exc).__name__
                    raise ChannelClosed(
                        channel, peer, f"could not connect within {connect_timeout_s:g} s: {detail}"
                    ) from None
                await asyncio.sleep(min(delay, remaining))
                delay = min(delay * 2, 1.0)
        transport = writer.transport
        _tune_socket(transport.get_extra_info("socket"))
        # pause_writing above capacity_bytes; resume at half, so the pipe stays full meanwhile.
        transport.set_write_buffer_limits(high=capacity_bytes, low=capacity_bytes // 2)
        writer.write(encode_hello(Hello(job_id=job_id, generation=generation, token=token, channel=channel)))
        return cls(reader, writer, channel, peer)

    @property
    def accepted(self) -> bool:
        """Whether the receiver acknowledged the hello (its channel is registered and reading)."""
        return self._accepted

    async def wait_accepted(self, timeout_s: float = REGISTRATION_TIMEOUT_S + 5.0) -> None:
        """Wait for the receiver's acknowledgement; raises ChannelClosed with the receiver's reason
        if it refused, or if nothing came within `timeout_s`. Optional: `send()` works before."""
        try:
            await asyncio.wait_for(self._state_changed.wait(), timeout_s)
        except TimeoutError:
            raise ChannelClosed(self.channel, self.peer, f"no answer to the hello within {timeout_s:g} s") from None
        if self._failure is not None and not self._accepted:
            raise self._failure

    async def send(self, msg: Message) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closing:
            raise ChannelClosed(self.channel, self.peer, "send after close()", after_end=self._sent_end)
        bufs = self._encoder.encode(msg)  # TypeError for a non-message: a bug, not a channel error
        transport = self._writer.transport
        if transport.is_closing():
            raise self._failure or ChannelClosed(self.channel, self.peer, "connection closed")
        _write(transport, bufs)
        if isinstance(msg, EndOfStream):
            self._sent_end = True
        self.blocked.start()  # drain returns at once unless the send buffer is over its bound
        try:
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            if self._failure is None:
                self._fail(f"connection lost: {exc or type(exc).__name__}")
            assert self._failure is not None
            raise self._failure from None
        finally:
            self.blocked.stop()

    async def close(self) -> None:
        """Flush what is buffered (up to CLOSE_TIMEOUT_S, then abort) and close; idempotent, never
        raises. Send EndOfStream before, or the receiver sees a broken stream."""
        if self._closing:
            return
        self._closing = True
        transport = self._writer.transport
        try:
            if not transport.is_closing():
                self._writer.close()
            await asyncio.wait_for(self._writer.wait_closed(), CLOSE_TIMEOUT_S)
        except TimeoutError:
            log.warning(
                "channel %s to %s: buffered data not flushed within %g s; aborting",
                self.channel, self.peer, CLOSE_TIMEOUT_S,
            )
            transport.abort()
        except (ConnectionError, OSError):
            pass  # the peer already went; nothing left to flush to
        if not self._watcher.done():
            self._watcher.cancel()
        await asyncio.gather(self._watcher, return_exceptions=True)

    # -- internal -------------------------------------------------------------------------------

    def _fail(self, reason: str) -> None:
        if self._failure is None:
            self._failure = ChannelClosed(self.channel, self.peer, reason, after_end=self._sent_end)
        self._state_changed.set()
        # Wake a send() blocked in drain(): the peer will never read what is buffered.
        self._writer.transport.abort()

    async def _watch(self) -> None:
        """Read what the receiver sends us: the accept, or an error frame, or the end."""
        frames = FrameReader(max_frame_bytes=MAX_HELLO_BYTES)
        reason: str
        try:
            while True:
                data = await self._reader.read(64 * 1024)
                if not data:
                    reason = "receiver closed the connection"
                    break
                frames.feed(data)
                while (frame := frames.next_frame()) is not None:
                    if frame.kind == FrameKind.ACCEPT:
                        self._accepted = True
                        self._state_changed.set()
                    elif frame.kind == FrameKind.ERROR:
                        self._fail(f"refused by receiver: {decode_error(frame.payload)}")
                        return
                    else:
                        raise FramingError(f"unexpected {frame.kind.name} frame from the receiver")
        except (ConnectionError, OSError) as exc:
            reason = f"connection lost: {exc or type(exc).__name__}"
        except FramingError as exc:
            reason = f"bad data from receiver: {exc}"
        if not self._closing:
            if not self._sent_end:
                log.warning("channel %s to %s: %s", self.channel, self.peer, reason)
            self._fail(reason)


def _write(transport: asyncio.WriteTransport, bufs: list[bytes | memoryview]) -> None:
    """Write the frames without copying large payloads."""
    if sys.version_info >= (3, 12):
        # 3.12+ selector transports send a list with sendmsg(), no join.
        transport.writelines(bufs)
        return
    # 3.11 writelines joins (copies) everything; join only the small pieces instead.
    small: list[bytes | memoryview] = []
    for b in bufs:
        if len(b) <= _COALESCE_BYTES:
            small.append(b)
            continue
        if small:
            transport.write(b"".join(small))
            small = []
        transport.write(b)
    if small:
        transport.write(b"".join(small) if len(small) > 1 else small[0])
