"""Runner-host benchmark: start, recovery and host loss with `sluice host` processes, cold vs warm.

Run:  PYTHONPATH=. .venv/bin/python bench/hosts.py [--runs N] [--quick] [--json PATH]
      (or `make bench-hosts`)

Everything runs on this machine, on loopback, and is owned by this script: a headless `temporal
server start-dev` (sluice.devserver.DevServer) with its own temporary state directory, an
in-process controller worker with no local host (`create_worker(..., local_slots=0)`), and two
pairs of `sluice host` subprocesses sharing one SLUICE_SECRET:

  baseline   hosts hA-cold, hB-cold: --warm-runners 0 (every runner is a fresh process start, what
             the process scheduler paid before warm pools), label bench=cold;
  warm       hosts hA-warm, hB-warm: --warm-runners 2 (the default), label bench=warm.

Each host has 8 slots and its own state directory. A job requires its configuration's label
(pipeline `host_labels`), so it is placed on that configuration's pair only; with placement
spreading runners, each host of the pair gets one of the job's two runners. Runs alternate between
the configurations (run i: both configurations, the one going first alternating), so both see the
same machine load.

The job (bench/lifecycle.py's): generator (2 splits, unbounded, rate-limited) -> files sink,
parallelism 2, slots_per_runner 1 (two runners), a checkpoint every second. A fresh job for each
fault, so every recovery is the job's first (same restart backoff every time):

  start      JobClient.start -> Running (wait_for_state returns), on every job (3 per run and config).
  runner     after a checkpoint, SIGKILL one runner (its pid from status().runners, verified) ->
             Running again with a higher generation.
  host       after a checkpoint, SIGKILL the `sluice host` process of the first runner's host and
             then that host's runners (pids from status().runners whose host_id matches): a machine
             death -> Running again. The killed host is then restarted (same id and state dir) and
             the next run waits until it is registered again and its warm pool is full.
  frozen     after a checkpoint, SIGSTOP one runner -> Running again; the frozen process is then
             SIGCONTed, and SIGKILLed if it is still that runner, so nothing stays stopped.

For every fault row the split from the job's transitions (workflow.now() times, this machine's
clock): fault -> Recovering (detection) and Recovering -> Running (the rest).

Cleanup (also on error or Ctrl-C): stopped runners are continued, every job still open is
force-stopped, every runner under every host's state directory is stopped by pid, the hosts get
SIGTERM (deregister, stop their runners; SIGKILL after 15 s), the worker shuts down, the server is
stopped and the temporary directory removed (unless --keep).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
for _p in (str(REPO), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import lifecycle
from bench_common import stop_jobs_and_runners
from lifecycle import STEP_TIMEOUT_S, summarize, ts

from sluice.runner.protocol import WARM_FLAG

CONFIGS = {"baseline": ("cold", 0), "warm": ("warm", 2)}  # name -> (host label / id suffix, --warm-runners)
SLOTS = 8
POLL_FAST_S = 0.02  # runner SIGKILL: as bench/lifecycle.py
POLL_SLOW_S = 0.1  # host kill, frozen runner: detection takes seconds; fewer status queries
HOST_READY_TIMEOUT_S = 90.0
HOST_STOP_TIMEOUT_S = 15.0
WARM_IDLE_S = 0.7  # a warm process whose CPU time did not move for this long waits on its stdin
TARGETS = {"start": 0.3, "runner": 0.6, "host": 10.0, "frozen": None}


# ----------------------------------------------------------------------------- hosts


def _proc_children(ppid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 1 and fields[1] == str(ppid):
            out.append(int(d.name))
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        return [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return []


def _cpu_ticks(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return None


@dataclass
class Host:
    host_id: str
    label: str
    warm: int
    state_dir: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def log_path(self) -> Path:
        return self.state_dir / f"host-{self.starts}.log"

    def start(self) -> None:
        self.starts += 1
        self.state_dir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "sluice.cli", "host", "--slots", str(SLOTS), "--host-id", self.host_id,
                "--state-dir", str(self.state_dir), "--warm-runners", str(self.warm),
                "--label", f"bench={self.label}"]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches the bench only; cleanup stops the hosts in order
            )

    async def wait_ready(self) -> float:
        """Until this process registered (it prints its banner after registering) and, with a warm
        pool, its warm processes are all started and idle (imports done). Returns the time waited."""
        t0 = time.perf_counter()
        deadline = time.monotonic() + HOST_READY_TIMEOUT_S
        assert self.proc is not None
        while "runner slots on task queue" not in self.log_path.read_text(errors="replace"):
            if self.proc.poll() is not None:
                raise RuntimeError(f"host {self.host_id} exited ({self.proc.returncode}); see {self.log_path}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"host {self.host_id} did not register; see {self.log_path}")
            await asyncio.sleep(0.05)
        await self.wait_warm(deadline)
        return time.perf_counter() - t0

    async def wait_warm(self, deadline: float | None = None) -> None:
        """Until `warm` children `sluice.runner --warm` sit idle (no CPU time for WARM_IDLE_S: imports
        done, waiting on stdin). A taken warm process (a runner now) keeps its command line but is
        busy, so it does not count."""
        if self.warm == 0 or self.proc is None:
            return
        deadline = deadline or time.monotonic() + HOST_READY_TIMEOUT_S
        seen: dict[int, tuple[int | None, float]] = {}  # pid -> (cpu ticks, since when unchanged)
        while True:
            now = time.monotonic()
            idle = 0
            current: dict[int, tuple[int | None, float]] = {}
            for pid in _proc_children(self.proc.pid):
                if WARM_FLAG not in _cmdline(pid):
                    continue
                cpu = _cpu_ticks(pid)
                prev = seen.get(pid)
                current[pid] = prev if prev is not None and prev[0] == cpu else (cpu, now)
                if cpu is not None and now - current[pid][1] >= WARM_IDLE_S:
                    idle += 1
            seen = current
            if idle >= self.warm:
                return
            if now > deadline:
                raise TimeoutError(f"host {self.host_id}: warm pool not full and idle in time")
            await asyncio.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL this host process (our child: the PID is its own until we reap it)."""
        assert self.proc is not None and self.proc.poll() is None
        self.proc.kill()
        self.proc.wait()

    def terminate(self) -> None:
        """SIGTERM: the host deregisters (an update the in-process controller worker must serve,
        so never wait for it with the event loop blocked) and stops its runners."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    async def wait_stopped(self) -> None:
        if self.proc is None:
            return
        deadline = time.monotonic() + HOST_STOP_TIMEOUT_S
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self.proc.poll() is None:
            print(f"host {self.host_id} did not stop on SIGTERM in {HOST_STOP_TIMEOUT_S:g} s: SIGKILL", file=sys.stderr)
            self.proc.kill()
            self.proc.wait()


async def stop_hosts(hosts: list[Host]) -> None:
    for h in hosts:
        h.terminate()
    await asyncio.gather(*(h.wait_stopped() for h in hosts))


# ----------------------------------------------------------------------------- the bench


@dataclass
class HostsBench(lifecycle.Bench):
    hosts: dict[str, Host] = field(default_factory=dict)
    frozen: list[tuple[int, str, int, int | None]] = field(default_factory=list)  # pid, job, gen, ticks

    def job_spec(self, job_id: str, label: str) -> Any:
        from sluice.models import PipelineSpec

        spec = lifecycle.Bench.spec(self, job_id)
        pipeline = PipelineSpec.model_validate(
            {**spec.pipeline.model_dump(mode="json"), "name": "bench_hosts", "host_labels": {"bench": label}}
        )
        return spec.model_copy(update={"pipeline": pipeline})

    def pair(self, config: str) -> list[Host]:
        label = CONFIGS[config][0]
        return [h for h in self.hosts.values() if h.label == label]

    async def start_job(self, jc: Any, config: str, tag: str) -> tuple[str, dict[str, Any], Any]:
        for h in self.pair(config):  # a warm pool refilled after the previous job, a restarted host
            await h.wait_warm()
        job_id = f"bh-{tag}-{uuid.uuid4().hex[:8]}"
        self.jobs.append(job_id)
        r: dict[str, Any] = {"job_id": job_id, "config": config}
        wall0 = time.time()
        t0 = time.perf_counter()
        await jc.start(self.job_spec(job_id, CONFIGS[config][0]))
        st = await jc.wait_for_state(job_id, ["Running"], timeout_s=STEP_TIMEOUT_S)
        r["start_s"] = time.perf_counter() - t0
        running = [t for t in st.transitions if t.to_state == "Running"]
        r["start_transition_s"] = ts(running[-1].time) - wall0
        r["wall0"] = wall0
        r["runner_hosts"] = sorted(x.host_id or "?" for x in st.runners)
        return job_id, r, st

    async def fault(
        self, jc: Any, config: str, kind: str, tag: str, poll_s: float,
        inflict: Callable[[Any, Any], Awaitable[Callable[[], None] | None]],
    ) -> dict[str, Any]:  # fmt: skip
        """A fresh job; after a checkpoint, `inflict(job_id, status)` (returns an after-Running
        clean-up, or None); time until Running again in a higher generation; stop the job."""
        job_id, r, st = await self.start_job(jc, config, tag)
        r["fault"] = kind
        gen1 = st.generation
        st = await self.wait_epoch(jc, job_id, above=0, generation=gen1)
        after: Callable[[], None] | None = None
        try:
            fault_wall = time.time()
            t0 = time.perf_counter()
            after = await inflict(job_id, st)
            deadline = time.monotonic() + STEP_TIMEOUT_S
            while True:
                st = await jc.status(job_id)
                if st.state != "Running" or st.generation != gen1:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id}: {kind} not noticed within {STEP_TIMEOUT_S:g} s")
                await asyncio.sleep(poll_s)
            r["noticed_by_poll_s"] = time.perf_counter() - t0
            if not (st.state == "Running" and st.generation > gen1):
                st = await jc.wait_for_state(job_id, ["Running"], timeout_s=STEP_TIMEOUT_S)
            r["to_running_s"] = time.perf_counter() - t0
        finally:
            if after is not None:
                after()
        if st.generation <= gen1:
            raise RuntimeError(f"job {job_id}: Running again but generation {st.generation} <= {gen1}")
        later = [t for t in st.transitions if ts(t.time) >= fault_wall - 0.005]
        rec = next((t for t in later if t.to_state == "Recovering"), None)
        run2 = [t for t in later if t.to_state == "Running"]
        if rec is not None and run2:
            r["detect_s"] = ts(rec.time) - fault_wall
            r["recover_s"] = ts(run2[-1].time) - ts(rec.time)
            r["to_running_transition_s"] = ts(run2[-1].time) - fault_wall
            r["recovering_reason"] = rec.reason
            comp = next((t for t in later if t.to_state == "Compiling" and t.time >= rec.time), None)
            if comp is not None:
                r["backoff_teardown_s"] = ts(comp.time) - ts(rec.time)
                r["new_generation_s"] = ts(run2[-1].time) - ts(comp.time)
        r["runner_hosts_after"] = sorted(x.host_id or "?" for x in st.runners)
        r["transitions"] = [
            {"at_s": round(ts(t.time) - r["wall0"], 4), "from": t.from_state, "to": t.to_state, "reason": t.reason}
            for t in st.transitions
        ]
        r["fault_at_s"] = round(fault_wall - r["wall0"], 4)
        self.log(
            f"{config:8} {kind:6} {job_id}: start {r['start_s']:.3f} s; Running again in {r['to_running_s']:.3f} s "
            f"(detect {r.get('detect_s', float('nan')):.3f} s, rest {r.get('recover_s', float('nan')):.3f} s) "
            f"on {','.join(r['runner_hosts_after'])}; reason: {str(r.get('recovering_reason'))[:110]}"
        )
        await jc.stop(job_id, mode="force")
        await jc.wait_for_state(job_id, ["Stopped"], timeout_s=STEP_TIMEOUT_S)
        return r

    # ------------------------------------------------------------------ the faults

    async def kill_runner(self, job_id: str, st: Any) -> None:
        from sluice.schedulers.process import is_runner_process

        v = st.runners[0]
        if v.pid is None or not is_runner_process(v.pid, job_id, st.generation, started_ticks=v.started_ticks):
            raise RuntimeError(f"pid {v.pid} is not a runner of {job_id} generation {st.generation}; not killing it")
        os.kill(v.pid, signal.SIGKILL)

    async def freeze_runner(self, job_id: str, st: Any) -> Callable[[], None]:
        from sluice.schedulers.process import is_runner_process

        v = st.runners[0]
        gen = st.generation
        if v.pid is None or not is_runner_process(v.pid, job_id, gen, started_ticks=v.started_ticks):
            raise RuntimeError(f"pid {v.pid} is not a runner of {job_id} generation {gen}; not stopping it")
        entry = (v.pid, job_id, gen, v.started_ticks)
        self.frozen.append(entry)
        os.kill(v.pid, signal.SIGSTOP)

        def thaw() -> None:
            self.thaw(entry)

        return thaw

    def thaw(self, entry: tuple[int, str, int, int | None]) -> None:
        """SIGCONT a runner this bench stopped, and SIGKILL it if it is still there (superseded)."""
        from sluice.schedulers.process import is_runner_process

        pid, job_id, gen, ticks = entry
        if entry in self.frozen:
            self.frozen.remove(entry)
        if is_runner_process(pid, job_id, gen, started_ticks=ticks):
            os.kill(pid, signal.SIGCONT)
            if is_runner_process(pid, job_id, gen, started_ticks=ticks):
                os.kill(pid, signal.SIGKILL)
                self.log(f"frozen runner pid {pid} was still there after recovery: continued and killed")

    def host_killer(self, killed: list[Host]) -> Callable[[str, Any], Awaitable[None]]:
        async def kill_host(job_id: str, st: Any) -> None:
            from sluice.schedulers.process import is_runner_process

            host_id = st.runners[0].host_id
            host = self.hosts[host_id]
            victims = [x for x in st.runners if x.host_id == host_id]
            for v in victims:  # all checked before anything is signalled
                if v.pid is None or not is_runner_process(v.pid, job_id, st.generation, started_ticks=v.started_ticks):
                    raise RuntimeError(f"pid {v.pid} is not a runner of {job_id} on {host_id}; not killing it")
            killed.append(host)
            host.kill()  # the machine dies: its host process first, then its runners
            for v in victims:
                os.kill(v.pid, signal.SIGKILL)

        return kill_host

    async def run_config(self, jc: Any, config: str, index: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        out["runner"] = await self.fault(jc, config, "runner", f"{index}r", POLL_FAST_S, self.kill_runner)
        out["frozen"] = await self.fault(jc, config, "frozen", f"{index}f", POLL_SLOW_S, self.freeze_runner)
        killed: list[Host] = []
        try:
            out["host"] = await self.fault(jc, config, "host", f"{index}h", POLL_SLOW_S, self.host_killer(killed))
        finally:
            for h in killed:  # the machine comes back: same id and state directory
                h.start()
                waited = await h.wait_ready()
                self.log(f"restarted host {h.host_id}: ready after {waited:.1f} s")
        return out

    async def cleanup_all(self, jc: Any) -> None:
        for entry in list(self.frozen):
            try:
                self.thaw(entry)
            except OSError:
                pass
        for h in self.hosts.values():
            await stop_jobs_and_runners(jc, h.state_dir, self.jobs)
            jc = None  # jobs are force-stopped once; the other hosts' runners only need stopping


# ----------------------------------------------------------------------------- report

ROWS: list[tuple[str, str, str]] = [
    # key in the samples, label, which target ("" for a split row)
    ("start", "1. start -> Running", "start"),
    ("runner", "2. runner SIGKILL -> Running", "runner"),
    ("runner.detect", "   kill -> Recovering", ""),
    ("runner.recover", "   Recovering -> Running", ""),
    ("runner.backoff_teardown", "     Recovering -> Compiling (backoff, teardown)", ""),
    ("runner.new_generation", "     Compiling -> Running (new generation)", ""),
    ("host", "3. host killed -> Running elsewhere", "host"),
    ("host.detect", "   kill -> Recovering", ""),
    ("host.recover", "   Recovering -> Running", ""),
    ("host.backoff_teardown", "     Recovering -> Compiling (backoff, teardown)", ""),
    ("host.new_generation", "     Compiling -> Running (new generation)", ""),
    ("frozen", "4. runner SIGSTOP -> Running", "frozen"),
    ("frozen.detect", "   stop -> Recovering", ""),
    ("frozen.recover", "   Recovering -> Running", ""),
    ("frozen.backoff_teardown", "     Recovering -> Compiling (backoff, teardown)", ""),
    ("frozen.new_generation", "     Compiling -> Running (new generation)", ""),
]


def collect(runs: list[dict[str, Any]], config: str) -> dict[str, list[float]]:
    s: dict[str, list[float]] = {k: [] for k, _, _ in ROWS}
    for run in runs:
        rec = run.get(config)
        if not rec:
            continue
        for kind in ("runner", "frozen", "host"):
            r = rec.get(kind)
            if not r:
                continue
            s["start"].append(r["start_s"])
            s[kind].append(r["to_running_s"])
            for key, value in transition_splits(r).items():
                s[f"{kind}.{key}"].append(value)
    return s


def transition_splits(r: dict[str, Any]) -> dict[str, float]:
    """From a fault job's transition timeline (seconds since JobClient.start): fault -> Recovering
    (detect), Recovering -> Running (recover), and the latter's two parts: Recovering -> Compiling
    (the restart backoff and the old generation's teardown) and Compiling -> Running (the new
    generation: compile, place, start runners, start execution)."""
    fault = r["fault_at_s"] - 0.005
    later = [t for t in r["transitions"] if t["at_s"] >= fault]
    rec = next((t for t in later if t["to"] == "Recovering"), None)
    if rec is None:
        return {}
    running = [t for t in later if t["to"] == "Running" and t["at_s"] >= rec["at_s"]]
    comp = next((t for t in later if t["to"] == "Compiling" and t["at_s"] >= rec["at_s"]), None)
    out = {"detect": rec["at_s"] - r["fault_at_s"]}
    if running:
        out["recover"] = running[-1]["at_s"] - rec["at_s"]
        if comp is not None:
            out["backoff_teardown"] = comp["at_s"] - rec["at_s"]
            out["new_generation"] = running[-1]["at_s"] - comp["at_s"]
    return out


def why(reason: str | None) -> str:
    """What made the job recover, in a few words (from its Recovering transition's reason)."""
    r = reason or ""
    if "sent nothing for" in r:
        return "host report: runner silent (hang timeout)"
    if r.startswith("runner lost") and "exited" in r:
        return "host report: runner exited"
    if r.startswith("checkpoint failed"):
        return "checkpoint failed (runner unreachable)"
    if "lost" in r and "host" in r:
        return "host lost (registry)"
    return r[:60] or "?"


def recovery_causes(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, int]]]:
    out: dict[str, dict[str, dict[str, int]]] = {}
    for run in runs:
        for config, rec in run.items():
            for kind, r in rec.items():
                c = out.setdefault(config, {}).setdefault(kind, {})
                k = why(r.get("recovering_reason"))
                c[k] = c.get(k, 0) + 1
    return out


def build_results(runs: list[dict[str, Any]], warmup: list[dict[str, Any]]) -> dict[str, Any]:
    import temporalio

    samples = {c: collect(runs, c) for c in CONFIGS}
    summary = {c: {k: summarize(v) for k, v in samples[c].items()} for c in CONFIGS}
    return {
        "benchmark": "hosts",
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "nproc": os.cpu_count(),
            "python": platform.python_version(),
            "temporalio": temporalio.__version__,
            "platform": platform.platform(),
        },
        "targets_s": TARGETS,
        "summary": summary,
        "recovery_causes": recovery_causes(runs),
        "samples": samples,
        "runs": runs,
        "warmup_runs": warmup,
    }


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    def s3(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    rows = []
    for key, label, target in ROWS:
        b, w = results["summary"]["baseline"][key], results["summary"]["warm"][key]
        ratio = (w["median"] / b["median"]) if (b["median"] and w["median"] is not None) else None
        t = TARGETS.get(target) if target else None
        rows.append([
            label, str(b["n"]), s3(b["median"]), f"{s3(b['min'])}-{s3(b['max'])}",
            str(w["n"]), s3(w["median"]), f"{s3(w['min'])}-{s3(w['max'])}",
            "-" if ratio is None else f"{ratio:.2f}",
            f"<= {t:g}" if t is not None else ("-" if target else ""),
        ])  # fmt: skip
    return rows


HEADER = ["row (seconds)", "n", "baseline median", "min-max", "n", "warm median", "min-max", "warm/base", "target"]


def print_table(results: dict[str, Any]) -> None:
    rows = table_rows(results)
    widths = [max(len(HEADER[i]), *(len(r[i]) for r in rows)) for i in range(len(HEADER))]
    print()
    print("  ".join(h.ljust(widths[i]) if i == 0 else h.rjust(widths[i]) for i, h in enumerate(HEADER)))
    for r in rows:
        print("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
    for config, kinds in results["recovery_causes"].items():
        for kind, causes in kinds.items():
            print(f"  {config} {kind}: recovered on " + "; ".join(f"{k} x{n}" for k, n in causes.items()))
    m = results["machine"]
    print(f"\n{m['nproc']} cores, Python {m['python']}, temporalio {m['temporalio']}, "
          f"load {m.get('loadavg_at_start')} at start, {m.get('loadavg_at_end')} at end")  # fmt: skip


def markdown_table(results: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|---|" + "---:|" * (len(HEADER) - 1)]
    for r in table_rows(results):
        lines.append("| " + " | ".join(r) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    import sluice
    from sluice.client import JobClient, connect
    from sluice.devserver import DevServer, free_port
    from sluice.worker import create_worker

    state_dir = Path(tempfile.mkdtemp(prefix="sluice-bench-hosts-"))
    secret = secrets.token_hex(32)
    os.environ["SLUICE_SECRET"] = secret  # the controller (load_secret) and the hosts share it
    bench = HostsBench(state_dir=state_dir, rate=args.rate, verbose=not args.quiet)
    server = DevServer(state_dir / "temporal", port=free_port(), ui_port=None, headless=True)
    load_start = os.getloadavg()
    t_begin = time.perf_counter()
    print(f"sluice from {sluice.__file__}; state dir {state_dir}; dev server on {server.address}", flush=True)
    # The controller worker's logs (activity failures with tracebacks are expected here) go to a file.
    logging.basicConfig(filename=state_dir / "controller.log", level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    await server.astart()
    env = dict(os.environ)
    env.update(
        TEMPORAL_ADDRESS=server.address, TEMPORAL_NAMESPACE="default", SLUICE_SECRET=secret, PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
    )  # fmt: skip
    env.pop("SLUICE_STATE_DIR", None)
    env.pop("SLUICE_WARM_RUNNERS", None)
    for label, warm in CONFIGS.values():
        for name in ("hA", "hB"):
            host_id = f"{name}-{label}"
            bench.hosts[host_id] = Host(host_id, label, warm, state_dir / "hosts" / host_id, env)
    jc = None
    runs: list[dict[str, Any]] = []
    warmup: list[dict[str, Any]] = []
    try:
        client = await connect(server.address)
        bench.client = client
        jc = JobClient(client)
        controller = create_worker(client, state_dir / "controller", local_slots=0)
        async with controller:
            try:
                for h in bench.hosts.values():
                    h.start()
                for h in bench.hosts.values():
                    waited = await h.wait_ready()
                    bench.log(f"host {h.host_id} (warm runners {h.warm}) ready after {waited:.1f} s")
                order = list(CONFIGS)
                for i in range(args.warmup):
                    for config in order:
                        bench.log(f"warm-up {i + 1}/{args.warmup} {config}")
                        warmup.append(await bench.fault(jc, config, "runner", f"w{i}", POLL_FAST_S, bench.kill_runner))
                for i in range(args.runs):
                    run: dict[str, Any] = {}
                    for config in (order if i % 2 == 0 else order[::-1]):
                        bench.log(f"run {i + 1}/{args.runs} {config}")
                        run[config] = await bench.run_config(jc, config, i + 1)
                    runs.append(run)
            finally:
                await bench.cleanup_all(jc)
                await stop_hosts(list(bench.hosts.values()))  # while the controller serves their deregistration
        results = build_results(runs, warmup)
        results["machine"]["loadavg_at_start"] = tuple(round(x, 2) for x in load_start)
        results["machine"]["loadavg_at_end"] = tuple(round(x, 2) for x in os.getloadavg())
        results["config"] = {
            "runs": args.runs,
            "warmup": args.warmup,
            "hosts": {
                h.host_id: {"warm_runners": h.warm, "slots": SLOTS, "label": f"bench={h.label}"}
                for h in bench.hosts.values()
            },
            "pipeline": f"generator(splits 2, unbounded, rate {args.rate:g}/s per split) -> files",
            "parallelism": 2,
            "slots_per_runner": 1,
            "checkpoint_interval_s": 1,
            "dev_server": server.command()[1:],
        }
        results["total_s"] = time.perf_counter() - t_begin
        return results
    finally:
        for h in bench.hosts.values():  # only after an error before the normal path stopped them
            if h.proc is not None and h.proc.poll() is None:
                h.proc.kill()
                h.proc.wait()
        await server.astop()
        if args.keep:
            print(f"kept {state_dir}")
        else:
            shutil.rmtree(state_dir, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--runs", type=int, default=5, help="measured runs, each with both configurations (default 5)")
    p.add_argument("--quick", action="store_true", help="a smoke test: --runs 2")
    p.add_argument("--warmup", type=int, default=1,
                   help="unrecorded runner-kill jobs per configuration first (default 1)")
    p.add_argument("--rate", type=float, default=1000.0, help="generator rows per second per split (default 1000)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the results as JSON here")
    p.add_argument("--markdown", type=Path, default=None, metavar="PATH", help="write the table as markdown here")
    p.add_argument("--keep", action="store_true", help="keep the temporary state directory (server, host, runner logs)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the table")
    p.add_argument("--report", type=Path, default=None, metavar="JSON",
                   help="measure nothing: print the table of a JSON file an earlier run wrote")  # fmt: skip
    args = p.parse_args()
    if args.quick:
        args.runs = 2
    if args.runs < 1:
        p.error("--runs must be >= 1")
    if args.report is not None:
        old = json.loads(args.report.read_text())
        results = build_results(old["runs"], old.get("warmup_runs", []))
        for key in ("time", "machine", "config", "total_s"):
            results[key] = old.get(key)
        args.json = None
    else:
        results = asyncio.run(main_async(args))
    print_table(results)
    print(f"total {results['total_s']:.1f} s")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    if args.markdown is not None:
        args.markdown.write_text(markdown_table(results) + "\n")
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
