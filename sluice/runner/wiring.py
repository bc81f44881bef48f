"""Channels of one runner's subtasks: which are in-process and which cross to a peer over TCP.

For every edge of the program, a sender subtask and a receiver subtask share one channel. When
the start request's assignments put both on this runner, it is a :class:`LocalChannel` (created
once, used by both ends); otherwise this runner registers the receiving end with its data server,
or connects the sending end to the peer's data port (the peer registers its receiving end when
its own start request arrives; the data server waits for that).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from sluice.engine.channels import ChannelId, DataServer, LocalChannel, RemoteSender
from sluice.engine.routing import InputChannel, Output, Sender
from sluice.models import Edge, RunnerInfo, StartRequest, SubtaskRef

#: messages (batches or control) a channel buffers before its sender waits
CHANNEL_CAPACITY = 16
#: bytes a TCP sender's transport buffers before its sender waits, at most...
SEND_BUFFER_BYTES = 4 * 1024 * 1024
#: ...and at least, when a runner's budget is shared by many channels
MIN_SEND_BUFFER_BYTES = 256 * 1024
#: what all TCP senders of one runner may buffer together (memory stays bounded at any parallelism)
RUNNER_SEND_BUDGET_BYTES = 64 * 1024 * 1024


@dataclass
class SubtaskChannels:
    inputs: list[InputChannel] = field(default_factory=list)
    outputs: list[Output] = field(default_factory=list)


class Wiring:
    """Builds the channels of the subtasks a start request assigns to runner `runner_id`."""

    def __init__(self, req: StartRequest, runner_id: str, data_server: DataServer | None, token: str) -> None:
        self.req = req
        self.program = req.program
        self.runner_id = runner_id
        self.data_server = data_server
        self.token = token
        self._where: dict[str, str] = {}  # subtask label -> runner id
        for a in req.assignments:
            for ref in a.subtasks:
                self._where[ref.label()] = a.runner_id
        for ref in req.subtasks:  # a request without assignments runs everything here
            self._where.setdefault(ref.label(), runner_id)
        self._peers: dict[str, RunnerInfo] = {p.runner_id: p for p in req.peers}
        self._local: dict[ChannelId, LocalChannel] = {}
        self._remote: list[RemoteSender] = []
        remote_senders = sum(
            1
            for ref in req.subtasks
            for edge in self.program.edges_out_of(ref.chain)
            for r in self.program.receivers(edge, ref.index)
            if self._runner_of(self.program.chain_of(edge.to_op), r) != runner_id
        )
        self.send_buffer_bytes = max(
            MIN_SEND_BUFFER_BYTES, min(SEND_BUFFER_BYTES, RUNNER_SEND_BUDGET_BYTES // max(1, remote_senders))
        )

    def _runner_of(self, chain: int, index: int) -> str:
        label = SubtaskRef(chain=chain, index=index).label()
        try:
            return self._where[label]
        except KeyError:
            raise ValueError(f"subtask {label} is assigned to no runner") from None

    def _local_channel(self, cid: ChannelId) -> LocalChannel:
        ch = self._local.get(cid)
        if ch is None:
            ch = self._local[cid] = LocalChannel(CHANNEL_CAPACITY)
        return ch

    def _receiver(self, edge: Edge, sender: int, receiver: int) -> InputChannel:
        cid = ChannelId(edge=edge.name, sender=sender, receiver=receiver)
        label = f"{edge.from_op}[{sender}] -> {edge.to_op}[{receiver}]"
        if self._runner_of(self.program.chain_of(edge.from_op), sender) == self.runner_id:
            return InputChannel(label, self._local_channel(cid))
        if self.data_server is None:
            raise RuntimeError(f"channel {label} crosses runners, but this runner has no data server")
        inbound = self.data_server.register(self.req.job_id, self.req.generation, cid, CHANNEL_CAPACITY)
        return InputChannel(
            f"{label} (from runner {self._runner_of(self.program.chain_of(edge.from_op), sender)})", inbound
        )

    async def _sender(self, edge: Edge, sender: int, receiver: int) -> Sender:
        cid = ChannelId(edge=edge.name, sender=sender, receiver=receiver)
        peer_id = self._runner_of(self.program.chain_of(edge.to_op), receiver)
        if peer_id == self.runner_id:
            return self._local_channel(cid)
        peer = self._peers.get(peer_id)
        if peer is None or peer.data_port is None:
            raise RuntimeError(f"runner {peer_id!r} (receiver of {edge.name}[{receiver}]) has no known data address")
        remote = await RemoteSender.connect(
            peer.host, peer.data_port,
            job_id=self.req.job_id, generation=self.req.generation, token=self.token, channel=cid,
            capacity_bytes=self.send_buffer_bytes,
        )
        self._remote.append(remote)
        return remote

    async def channels_of(self, ref: SubtaskRef) -> SubtaskChannels:
        """Input channels (every sender of every incoming edge) and outputs (one per outgoing edge)."""
        out = SubtaskChannels()
        for edge in self.program.edges_into(ref.chain):
            for s in self.program.senders(edge, ref.index):
                out.inputs.append(self._receiver(edge, s, ref.index))
        for edge in self.program.edges_out_of(ref.chain):
            receivers = self.program.receivers(edge, ref.index)
            senders = await asyncio.gather(*(self._sender(edge, ref.index, r) for r in receivers))
            out.outputs.append(Output(edge, senders, first=ref.index))
        return out

    async def close(self) -> None:
        """Close every TCP sender opened (after a failed start; running subtasks close their own)."""
        for r in self._remote:
            try:
                await r.close()
            except Exception:  # noqa: BLE001
                pass
