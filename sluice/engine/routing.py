"""How a subtask's chain meets the channels: an input gate in front, output routers behind.

:class:`InputGate` merges the channels feeding a subtask (one per upstream sender subtask, over
every incoming edge) into one ordered stream for the chain, and guarantees:

* barrier alignment: once barrier N arrived on a channel, that channel is not read again until
  barrier N arrived on every other open channel; only then does the gate hand out Barrier(N), so
  the snapshot covers exactly the records before barrier N on every input;
* watermarks: the gate's watermark is the lowest of its channels' (a channel that ended, or that
  said it is idle and has sent nothing since, does not hold it back); it hands out a Watermark
  only when that minimum advances, and Idle once when every open channel is idle;
* end of stream once, when every channel has sent it; after that only barriers come (the bounded
  upstreams keep answering checkpoints until one says then_stop);
* bounded memory: each channel reader holds at most one message beyond the gate's small mailbox.

:class:`Output` sends the chain's output over one outgoing edge: to the one pointwise receiver,
to the subtask owning each row's key hash (`hash`), or round-robin per batch (`rebalance`);
control messages go to every receiver.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa

from sluice.engine.channels import Receiver, Sender
from sluice.engine.keys import key_hashes, partition
from sluice.engine.messages import Barrier, EndOfStream, Idle, Message, Watermark
from sluice.models import Edge

#: messages the gate buffers ahead of the chain, over all its channels
GATE_MAILBOX = 8


class InputClosed(Exception):
    """A channel closed before end of stream: its sender is gone."""


@dataclass(frozen=True, slots=True)
class InputChannel:
    """One channel into the gate: where it comes from (for messages), and its receiving end."""

    label: str
    receiver: Receiver


class _Closed:
    """Mailbox item: a channel's reader saw it close (`error` says how)."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


class InputGate:
    """Merges channels with barrier alignment (see the module docstring)."""

    def __init__(self, channels: Sequence[InputChannel]) -> None:
        if not channels:
            raise ValueError("an input gate needs at least one channel")
        self.channels = list(channels)
        n = len(self.channels)
        self._mail: deque[tuple[int, Message | _Closed]] = deque()
        self._has_mail = asyncio.Event()
        self._has_room = asyncio.Event()
        self._has_room.set()
        self._released = [asyncio.Event() for _ in range(n)]
        self._watermarks: list[int | None] = [None] * n
        self._ended = [False] * n
        self._idle = [False] * n
        self._idle_sent = False
        self._closed = [False] * n
        self._aligning: dict[int, set[int]] = {}  # epoch -> channels whose barrier arrived
        self._barriers: dict[int, Barrier] = {}
        self._emitted_watermark: int | None = None
        self._eos_sent = False
        self._readers: list[asyncio.Task[None]] = []
        self._interrupted = False

    def backlog(self) -> int:
        """Messages waiting for the chain: in the mailbox and buffered in the channels."""
        n = len(self._mail)
        for ch in self.channels:
            try:
                n += len(ch.receiver)  # type: ignore[arg-type]
            except TypeError:  # a receiver that cannot tell
                pass
        return n

    def start(self) -> None:
        """Start reading every channel (from the running event loop)."""
        self._readers = [asyncio.ensure_future(self._read(i)) for i in range(len(self.channels))]

    def interrupt(self) -> None:
        """Make a pending or the next :meth:`next` return None at once (immediate stop)."""
        self._interrupted = True
        self._has_mail.set()

    async def close(self) -> None:
        """Stop reading and close every receiving end, so a sender still writing to this subtask
        fails at once instead of waiting on a full channel."""
        for t in self._readers:
            t.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        for ch in self.channels:
            close = getattr(ch.receiver, "close", None)
            if close is not None:
                try:
                    await close()
                except Exception:  # noqa: BLE001 - closing is best effort
                    pass

    async def _put(self, item: tuple[int, Message | _Closed]) -> None:
        while len(self._mail) >= GATE_MAILBOX:
            self._has_room.clear()
            await self._has_room.wait()
        self._mail.append(item)
        self._has_mail.set()

    async def _read(self, index: int) -> None:
        receiver = self.channels[index].receiver
        while True:
            try:
                msg = await receiver.receive()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a closed channel ends this reader
                await self._put((index, _Closed(exc)))
                return
            await self._put((index, msg))
            if isinstance(msg, Barrier):
                # Alignment: nothing more from this channel until every channel sent this barrier.
                await self._released[index].wait()
                self._released[index].clear()
                if msg.then_stop:
                    return

    async def _take(self) -> tuple[int, Message | _Closed] | None:
        while not self._mail:
            if self._interrupted:
                return None
            self._has_mail.clear()
            await self._has_mail.wait()
        if self._interrupted:
            return None
        item = self._mail.popleft()
        self._has_room.set()
        return item

    def _open(self) -> list[int]:
        return [i for i in range(len(self.channels)) if not self._closed[i]]

    def _watermark_advanced(self) -> Watermark | None:
        live = [w for i, w in enumerate(self._watermarks)
                if not self._ended[i] and not self._closed[i] and not self._idle[i]]
        if not live or any(w is None for w in live):
            return None
        wm = min(w for w in live if w is not None)
        if self._emitted_watermark is not None and wm <= self._emitted_watermark:
            return None
        self._emitted_watermark = wm
        return Watermark(wm)

    def _aligned(self) -> Barrier | None:
        open_now = set(self._open())
        for epoch in sorted(self._aligning):
            arrived = self._aligning[epoch]
            if open_now <= arrived:
                del self._aligning[epoch]
                barrier = self._barriers.pop(epoch)
                for i in arrived:
                    self._released[i].set()
                return barrier
        return None

    async def next(self) -> Message | None:
        """The next message for the chain; None when every channel has closed (or interrupted).

        Raises InputClosed when a channel closed before its end of stream.
        """
        while True:
            item = await self._take()
            if item is None:
                return None
            index, msg = item
            if isinstance(msg, (pa.RecordBatch, Watermark)) and self._idle[index]:
                self._idle[index] = self._idle_sent = False  # active again: it counts again
            if isinstance(msg, pa.RecordBatch):
                return msg
            if isinstance(msg, Idle):
                self._idle[index] = True
                wm = self._watermark_advanced()
                if wm is not None:
                    return wm
                live = [i for i in range(len(self.channels)) if not self._ended[i] and not self._closed[i]]
                if live and all(self._idle[i] for i in live) and not self._idle_sent:
                    self._idle_sent = True
                    return Idle()
            elif isinstance(msg, Watermark):
                cur = self._watermarks[index]
                if cur is None or msg.ts_ms > cur:
                    self._watermarks[index] = msg.ts_ms
                wm = self._watermark_advanced()
                if wm is not None:
                    return wm
            elif isinstance(msg, Barrier):
                self._barriers[msg.epoch] = msg
                self._aligning.setdefault(msg.epoch, set()).add(index)
                done = self._aligned()
                if done is not None:
                    return done
            elif isinstance(msg, EndOfStream):
                self._ended[index] = True
                if all(self._ended[i] or self._closed[i] for i in range(len(self.channels))):
                    if not self._eos_sent:
                        self._eos_sent = True
                        return msg
                else:
                    wm = self._watermark_advanced()
                    if wm is not None:
                        return wm
            elif isinstance(msg, _Closed):
                self._closed[index] = True
                if not self._ended[index] and not self._interrupted:
                    label = self.channels[index].label
                    why = f": {msg.error}" if msg.error is not None else ""
                    raise InputClosed(f"input channel {label} closed before end of stream{why}")
                if not self._open():
                    return None
                done = self._aligned()  # a closed channel no longer holds a barrier back
                if done is not None:
                    return done


class Output:
    """Sends a chain's output over one outgoing edge (see the module docstring)."""

    def __init__(self, edge: Edge, senders: Sequence[Sender], *, first: int = 0) -> None:
        """`first`: where a rebalance starts dealing (the sender's own index spreads the first
        batches of all senders over the receivers)."""
        if not senders:
            raise ValueError(f"edge {edge.name}: no receivers")
        if edge.kind == "hash" and not edge.key:
            raise ValueError(f"edge {edge.name}: a hash edge needs key columns")
        self.edge = edge
        self.senders = list(senders)
        self._next = first % len(self.senders)  # rebalance position

    async def emit(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        n = len(self.senders)
        if n == 1:
            await self.senders[0].send(batch)
        elif self.edge.kind == "hash":
            assert self.edge.key is not None
            parts = partition(batch, key_hashes(batch, self.edge.key), n)
            for sender, part in zip(self.senders, parts):
                if part is not None:
                    await sender.send(part)
        else:
            await self.senders[self._next].send(batch)
            self._next = (self._next + 1) % n

    async def broadcast(self, msg: Message) -> None:
        for sender in self.senders:
            await sender.send(msg)

    async def close(self) -> None:
        for sender in self.senders:
            try:
                await sender.close()
            except Exception:  # noqa: BLE001 - the receiver sees the close either way
                pass
