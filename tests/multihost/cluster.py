"""A sluice cluster over a `Network`: the first namespace is the Temporal server's machine, each
other namespace a runner host's (`sluice host`, its own state directory); controller workers
(`sluice worker --local-slots 0`) run in the root namespace or in a host's. The checkpoint store
and the sinks' output live in a directory every host reaches (the shared file system).

The dev server binds every address of its own namespace (0.0.0.0 there: its loopback and its
link, nothing of the machine's): bound to one non-loopback address, `temporal server start-dev`
dials its internal services on 127.0.0.1 and fails.

Every process is started here and stopped here, by PID (the namespaces' own processes are also
killed by the Network when it closes).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sluice.client import JobClient, connect, server_reachable
from sluice.devserver import DevServer
from sluice.models import JobConfig, JobSpec, PipelineSpec
from tests.e2e_helpers import unique_job_id
from tests.multihost.netns import Namespace, Network

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SECRET = "multihost-test-secret"
STOP_TIMEOUT_S = 15.0
SERVER_PORT = 7233  # inside the server's own namespace: nothing else is there
SERVER_START_TIMEOUT_S = 60.0


class Cluster:
    def __init__(self, network: Network, root: Path) -> None:
        self.network = network
        self.root = root
        self.shared = root / "shared"  # checkpoints and output: reachable from every host
        self.shared.mkdir(parents=True, exist_ok=True)
        self.server_ns = network.hosts[0]
        self.machines = network.hosts[1:]  # one runner host each
        self.server: subprocess.Popen[bytes] | None = None
        self.processes: list[subprocess.Popen[bytes]] = []
        self.hosts: dict[str, subprocess.Popen[bytes]] = {}

    # ---------------------------------------------------------------------------- processes

    @property
    def address(self) -> str:
        return f"{self.server_ns.address}:{SERVER_PORT}"

    async def start_server(self) -> None:
        server = DevServer(self.root / "temporal", ip="0.0.0.0", port=SERVER_PORT, headless=True)
        server.state_dir.mkdir(parents=True, exist_ok=True)
        self.server = self.server_ns.popen(server.command(), log_path=server.log_path)
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not await server_reachable(self.address):
            if self.server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the dev server did not start; see {server.log_path}")
            await asyncio.sleep(0.2)

    def env(self, state_dir: Path) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            TEMPORAL_ADDRESS=self.address,
            TEMPORAL_NAMESPACE="default",
            SLUICE_SECRET=SECRET,
            SLUICE_STATE_DIR=str(state_dir),
            PYTHONPATH=os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p),
            PYTHONUNBUFFERED="1",
        )
        return env

    def _spawn(self, ns: Namespace | None, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        state_dir = self.root / name
        state_dir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "sluice.cli", *args, "--state-dir", str(state_dir)]
        log_path = state_dir / "process.log"
        if ns is None:
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(argv, cwd=PROJECT_ROOT, env=self.env(state_dir), stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
        else:
            proc = ns.popen(argv, env=self.env(state_dir), cwd=str(PROJECT_ROOT), log_path=log_path)
        self.processes.append(proc)
        return proc

    def start_worker(
        self, ns: Namespace | None = None, *, max_activities: int | None = None
    ) -> subprocess.Popen[bytes]:
        """A controller worker with no local host (every runner lives on a `sluice host`)."""
        args = ["worker", "--local-slots", "0"]
        if max_activities is not None:
            args += ["--max-concurrent-activities", str(max_activities)]
        return self._spawn(ns, f"worker-{len(self.processes)}" + (f"-{ns.index}" if ns else ""), args)

    def start_host(self, ns: Namespace, slots: int, *labels: str) -> subprocess.Popen[bytes]:
        args = ["host", "--slots", str(slots), "--host-id", self.host_id(ns), "--bind", ns.address,
                "--advertise", ns.address, "--hang-timeout", "5"]  # fmt: skip
        for label in labels:
            args += ["--label", label]
        proc = self._spawn(ns, f"host-{self.host_id(ns)}", args)
        self.hosts[self.host_id(ns)] = proc
        return proc

    @staticmethod
    def host_id(ns: Namespace) -> str:
        return f"h{ns.index}"

    def log(self, name: str) -> str:
        try:
            return (self.root / name / "process.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Hosts first (they deregister through the controller workers), then the workers, then
        the server: each group SIGTERMed together, SIGKILLed after STOP_TIMEOUT_S."""
        hosts = list(self.hosts.values())
        workers = [p for p in self.processes if p not in hosts]
        for group in (hosts, workers):
            for proc in group:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            for proc in group:
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=STOP_TIMEOUT_S)
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            try:
                self.server.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait(timeout=STOP_TIMEOUT_S)

    # ---------------------------------------------------------------------------- jobs

    async def job_client(self) -> JobClient:
        return JobClient(await connect(self.address))

    def spec(self, pipeline: PipelineSpec, **config: Any) -> JobSpec:
        return JobSpec(
            job_id=unique_job_id(pipeline.name),
            pipeline=pipeline,
            config=JobConfig(**{"checkpoint_interval_s": 1.0, **config}),
            checkpoint_url=str(self.shared / "checkpoints"),
        )


def shuffling_pipeline(name: str, out: Path, *, limit: int, rate: float, parallelism: dict[str, int],
                       host_labels: dict[str, str] | None = None) -> PipelineSpec:  # fmt: skip
    """generator -> filter -> files sink, with different parallelism per operator, so records
    cross between runners (and hosts) over TCP."""
    ops: list[dict[str, Any]] = [
        {"id": "events", "type": "generator", "splits": 6, "keys": 20, "limit": limit, "rate": rate,
         "parallelism": parallelism["events"]},
        {"id": "filter0", "type": "filter", "fn": "tests.pipeline_functions:keep_even",
         "parallelism": parallelism["filter0"]},
        {"id": "out", "type": "files", "path": str(out), "format": "jsonl", "parallelism": parallelism["out"]},
    ]  # fmt: skip
    return PipelineSpec.model_validate(
        {"name": name, "parallelism": 1, "operators": ops, "host_labels": host_labels or {}}
    )
