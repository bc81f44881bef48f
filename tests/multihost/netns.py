"""Several "machines" on one Linux host, made of network namespaces, for multi-host tests.

What it builds
--------------
`Network(n_hosts)` (a context manager) makes, in the root namespace, one Linux bridge with an
address (`network.bridge_address`, host .1 of the subnet), and `n_hosts` network namespaces
(`network.hosts`, each a `Namespace`). Each namespace is joined to the bridge by a veth pair:
one end is a port of the bridge in the root namespace (`ns.root_link`), the other is `eth0`
inside the namespace with the host's own address (`ns.address`: .2, .3, ...); `lo` is up in
each namespace. So the root namespace reaches every host address, the hosts reach one another
and the bridge address: a Temporal server bound to `network.bridge_address` in the root
namespace is reachable from every host. The hosts have no default route: nothing they send
leaves the subnet. One of the hosts can play the server's machine instead (ask for one more).

A `Namespace` runs programs (`popen`, `run`: `ip netns exec NAME argv...`, which execs, so
`Popen.pid` is the program itself), lists them (`pids()`: `ip netns pids NAME`), and fails like
a machine: `kill_all()` SIGKILLs every process in it ("the machine died"), `cut()` takes its
bridge port down and `restore()` brings it back up ("a network partition": the namespace and
its processes keep running; packets are dropped, so a peer sees timeouts, not refusals).

Address range
-------------
Each `Network` takes one /24 out of 10.231.0.0/16 (10.231.X.0/24, X in 1..254, starting at a
random X and going round), the first one that overlaps no IPv4 address (`ip -o -4 addr`) and
no route of any table (`ip -4 route show table all`, the default route aside) of the root
namespace. The choice and the whole construction happen under an exclusive file lock
(`/run/lock/sluice-netns.lock`), so networks built at the same time, by the same run or by
parallel runs on this machine, never get the same subnet. Names carry a random 6-hex-digit
suffix, checked to be unused: namespace `sluice-SUFFIX-hI`, bridge `slbr-SUFFIX`, bridge port
`slv-SUFFIX-hI` (interface names stay within Linux's 15 characters; at most 99 hosts).

Cleanup guarantees
------------------
`Network.close()` (run by `__exit__`, also after an exception in the `with` body or in the
middle of construction) SIGKILLs every process still in its namespaces and reaps the ones it
started, deletes its veth pairs, its namespaces and its bridge, each step attempted even when
an earlier one failed, then checks that none of its namespaces (`ip netns list`) and none of
its links (`ip -o link`) is left and that no process it started is alive, and raises
`NetnsError` naming what is left otherwise. Only what this `Network` created is ever deleted
(the names are its own), and a process is signalled only after checking, through a pidfd and
`/proc/PID/ns/net`, that it is still in that namespace. Networks still open when the
interpreter exits are closed by an `atexit` hook; the `network` fixture closes its networks at
the end of each test. Nothing can clean up after the test process itself is SIGKILLed: then
`ip netns list | grep sluice-` and `ip -o link | grep -E 'slbr-|slv-'` show the leftovers.

How to run
----------
As root (CI and this machine are root), with iproute2 installed:

    pytest tests/multihost

Elsewhere `netns_available()` says why not, and the tests skip with that reason. Every test
under tests/multihost is marked `multihost` (`pytest -m multihost`, `-m "not multihost"`).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import ipaddress
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

SUBNET_PREFIX = "10.231"  # each Network takes one 10.231.X.0/24
THIRD_OCTETS = range(1, 255)
PREFIX_LEN = 24
BRIDGE_HOST = 1  # the bridge is .1; host i is .(i + FIRST_HOST)
FIRST_HOST = 2
MAX_HOSTS = 99  # keeps `slv-SUFFIX-hNN` within IFNAMSIZ - 1 = 15 characters
IFNAME_MAX = 15
NS_INTERFACE = "eth0"  # the veth end inside each namespace

NETNS_RUN_DIR = Path("/var/run/netns")  # where `ip netns add` puts its namespace files
LOCK_PATH = Path("/run/lock/sluice-netns.lock") if Path("/run/lock").is_dir() else None
IP_TIMEOUT_S = 10.0
GONE_TIMEOUT_S = 5.0  # for killed processes to die, and for deleted links/namespaces to go
RUN_TIMEOUT_S = 30.0

ROUTE_TYPES = frozenset(
    {"unicast", "local", "broadcast", "multicast", "anycast", "unreachable", "blackhole",
     "prohibit", "throw", "nat"}
)


class NetnsError(RuntimeError):
    """An `ip` command failed, or something was left after cleanup."""


# ------------------------------------------------------------------------------ `ip`


def _ip_path() -> str:
    candidates = ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip")
    path = shutil.which("ip") or next((p for p in candidates if os.access(p, os.X_OK)), None)
    if path is None:
        raise NetnsError("`ip` (iproute2) not found")
    return path


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`ip ARGS...`; raises NetnsError with its stderr when it fails (and `check`)."""
    argv = [_ip_path(), *args]
    try:
        done = subprocess.run(
            argv, check=False, capture_output=True, text=True, timeout=IP_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise NetnsError(f"`ip {' '.join(args)}` timed out after {IP_TIMEOUT_S:.0f} s") from exc
    if check and done.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done


def netns_names() -> set[str]:
    """The names `ip netns list` shows."""
    return {line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()}


def link_names() -> set[str]:
    """The interface names of the root namespace (`ip -o link`)."""
    names = set()
    for line in _ip("-o", "link").stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.add(parts[1].strip().split("@", 1)[0])
    return names


def _used_ipv4_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 address's network and every route of any table, in the root namespace."""
    used: list[ipaddress.IPv4Network] = []
    for line in _ip("-o", "-4", "addr", "show").stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            used.append(ipaddress.IPv4Interface(parts[parts.index("inet") + 1]).network)
    for line in _ip("-4", "route", "show", "table", "all").stdout.splitlines():
        parts = line.split()
        if not parts:
            continue
        dest = parts[1] if parts[0] in ROUTE_TYPES and len(parts) > 1 else parts[0]
        if dest == "default":
            continue
        with contextlib.suppress(ValueError):
            net = ipaddress.IPv4Network(dest, strict=False)
            if net.prefixlen > 0:
                used.append(net)
    return used


def pick_subnet(rng: random.Random | None = None) -> ipaddress.IPv4Network:
    """A 10.231.X.0/24 that overlaps no address and no route of the root namespace."""
    rng = rng or random.Random()
    used = _used_ipv4_networks()
    octets = list(THIRD_OCTETS)
    start = rng.randrange(len(octets))
    for x in octets[start:] + octets[:start]:
        candidate = ipaddress.IPv4Network(f"{SUBNET_PREFIX}.{x}.0/{PREFIX_LEN}")
        if not any(candidate.overlaps(net) for net in used):
            return candidate
    raise NetnsError(f"no free /{PREFIX_LEN} left in {SUBNET_PREFIX}.0.0/16")


@contextlib.contextmanager
def _creation_lock() -> Iterator[None]:
    """Serializes choosing names and subnets and creating them, across processes."""
    if LOCK_PATH is None:
        yield
        return
    with open(LOCK_PATH, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@functools.cache
def netns_available() -> str | None:
    """None if network namespaces, veth pairs and bridges can be made here, else why not."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN); run the multihost tests as root"
    try:
        _ip_path()
    except NetnsError as exc:
        return f"{exc}: install iproute2 (apt-get install -y iproute2)"
    suffix = secrets.token_hex(3)
    ns, br = f"sluice-probe-{suffix}", f"slbr-p{suffix}"
    veth = f"slv-p{suffix}"
    made_ns = made_br = False
    try:
        with _creation_lock():
            if ns in netns_names() or {br, veth} & link_names():
                return None  # a random name taken: as good as a success, don't touch it
            _ip("netns", "add", ns)
            made_ns = True
            _ip("link", "add", "name", br, "type", "bridge")
            made_br = True
            _ip("link", "add", veth, "type", "veth", "peer", "name", NS_INTERFACE, "netns", ns)
            _ip("link", "del", veth)
    except NetnsError as exc:
        return f"cannot make network namespaces here: {exc}"
    finally:
        if made_br:
            _ip("link", "del", br, check=False)
        if made_ns:
            _ip("netns", "del", ns, check=False)
    return None


# ------------------------------------------------------------------------------ processes


def _pid_alive(pid: int) -> bool:
    """True while `pid` is a process that is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _reap(procs: Sequence[subprocess.Popen[Any]]) -> None:
    for proc in procs:
        proc.poll()


# ------------------------------------------------------------------------------ Namespace


class Namespace:
    """One "machine": a network namespace with `eth0` (`address`) on the network's bridge."""

    def __init__(self, name: str, address: str, root_link: str, index: int) -> None:
        self.name = name
        self.address = address
        self.root_link = root_link  # its bridge port in the root namespace
        self.index = index
        self._procs: list[subprocess.Popen[bytes]] = []
        self._cut = False

    def __repr__(self) -> str:
        return f"Namespace({self.name!r}, {self.address!r}{', cut' if self._cut else ''})"

    @property
    def path(self) -> Path:
        return NETNS_RUN_DIR / self.name

    def exists(self) -> bool:
        return self.path.exists()

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside this namespace (`ip netns exec NAME argv...`)."""
        return [_ip_path(), "netns", "exec", self.name, *map(str, argv)]

    # -------------------------------------------------------------- programs

    def popen(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start `argv` in this namespace; its pid is the program's own (`ip netns exec` execs).

        `env` replaces the environment (as in `subprocess.Popen`; pass `{**os.environ, ...}` to
        extend it). With `log_path`, stdout and stderr are appended to that file; otherwise they
        go where this process's go. stdin is /dev/null. The network SIGKILLs it at the latest
        when it closes.
        """
        log = open(log_path, "ab") if log_path is not None else None  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                self.exec_argv(argv),
                env=dict(env) if env is not None else None,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT if log is not None else None,
            )
        finally:
            if log is not None:
                log.close()
        self._procs.append(proc)
        return proc

    def run(
        self,
        argv: Sequence[str],
        timeout: float = RUN_TIMEOUT_S,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        check: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` in this namespace to completion; stdout and stderr captured as text.

        Raises `subprocess.TimeoutExpired` after `timeout` s (the program is killed then; what
        it started in the background is not: `kill_all()` is).
        """
        return subprocess.run(
            self.exec_argv(argv),
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def pids(self) -> list[int]:
        """Every process in this namespace (`ip netns pids NAME`), whoever started it."""
        if not self.exists():
            return []
        _reap(self._procs)
        out = _ip("netns", "pids", self.name).stdout
        return sorted(int(tok) for tok in out.split() if tok.isdigit())

    def _signal_if_inside(self, pid: int, sig: int) -> None:
        """Send `sig` to `pid` only if that very process is (still) in this namespace."""
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return  # gone
        try:
            ours = os.stat(self.path)
            theirs = os.stat(f"/proc/{pid}/ns/net")
            if (theirs.st_dev, theirs.st_ino) != (ours.st_dev, ours.st_ino):
                return
            # The pidfd still names the process that had `pid` when it was opened; if that one
            # was still alive at the check, it is the one the check saw.
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, sig)
        except OSError:
            return  # exited meanwhile
        finally:
            os.close(pidfd)

    def kill_all(self, timeout_s: float = GONE_TIMEOUT_S) -> None:
        """SIGKILL every process in this namespace ("the machine died") and wait until none is.

        Processes started by `popen` are reaped. Raises NetnsError if some survive `timeout_s`.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            pids = self.pids()
            if not pids:
                break
            if time.monotonic() > deadline:
                raise NetnsError(f"{self.name}: processes still alive after SIGKILL: {pids}")
            for pid in pids:
                self._signal_if_inside(pid, signal.SIGKILL)
            time.sleep(0.02)
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))

    def started_alive(self) -> list[int]:
        """PIDs of processes started by `popen` that are still alive (not zombies)."""
        _reap(self._procs)
        return [p.pid for p in self._procs if p.returncode is None and _pid_alive(p.pid)]

    # -------------------------------------------------------------- network

    def cut(self) -> None:
        """Network partition: take this host's bridge port down (it keeps running, cut off)."""
        _ip("link", "set", "dev", self.root_link, "down")
        self._cut = True

    def restore(self) -> None:
        """End the partition: bring the bridge port back up."""
        _ip("link", "set", "dev", self.root_link, "up")
        self._cut = False

    @property
    def is_cut(self) -> bool:
        return self._cut


# ------------------------------------------------------------------------------ Network


_OPEN: dict[int, Network] = {}  # networks not yet closed, closed at interpreter exit


def _close_open_networks() -> None:
    for net in list(_OPEN.values()):
        try:
            net.close()
        except Exception as exc:  # noqa: BLE001 - at exit, report and go on with the others
            print(f"tests.multihost.netns: cleanup at exit: {exc}", file=sys.stderr)


atexit.register(_close_open_networks)


class Network:
    """A bridge in the root namespace with `n_hosts` namespaces on it; see the module doc."""

    def __init__(self, n_hosts: int = 3) -> None:
        if not 1 <= n_hosts <= MAX_HOSTS:
            raise ValueError(f"n_hosts must be 1..{MAX_HOSTS}, not {n_hosts}")
        self.n_hosts = n_hosts
        self.suffix = ""
        self.bridge = ""
        self.subnet: ipaddress.IPv4Network | None = None
        self.bridge_address = ""
        self.hosts: list[Namespace] = []
        # what this instance created (and so may delete), in creation order
        self._made_links: list[str] = []
        self._made_netns: list[str] = []
        self._started = False
        self._closed = False

    def __repr__(self) -> str:
        return f"Network({self.subnet}, bridge={self.bridge!r}, hosts={self.hosts!r})"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Namespace]:
        return iter(self.hosts)

    def __len__(self) -> int:
        return len(self.hosts)

    def __getitem__(self, index: int) -> Namespace:
        return self.hosts[index]

    # -------------------------------------------------------------- building

    def _pick_suffix(self) -> str:
        netns, links = netns_names(), link_names()
        while True:
            suffix = secrets.token_hex(3)
            names = self._names(suffix)
            if not (set(names["netns"]) & netns or set(names["links"]) & links):
                return suffix

    def _names(self, suffix: str) -> dict[str, list[str]]:
        links = [f"slbr-{suffix}"] + [f"slv-{suffix}-h{i}" for i in range(self.n_hosts)]
        assert all(len(n) <= IFNAME_MAX for n in links), links
        return {"netns": [f"sluice-{suffix}-h{i}" for i in range(self.n_hosts)], "links": links}

    def start(self) -> Self:
        """Build the bridge and the namespaces; on any failure, remove what was made and raise."""
        if self._started:
            raise RuntimeError("a Network is started once")
        reason = netns_available()
        if reason is not None:
            raise NetnsError(reason)
        self._started = True
        _OPEN[id(self)] = self
        try:
            with _creation_lock():
                self._build()
        except BaseException as exc:
            try:
                self.close()
            except Exception as cleanup_exc:  # noqa: BLE001 - the build failure comes first
                exc.add_note(f"cleanup after the failed build failed too: {cleanup_exc}")
            raise
        return self

    def _build(self) -> None:
        self.suffix = self._pick_suffix()
        names = self._names(self.suffix)
        self.subnet = pick_subnet()
        hosts = list(self.subnet.hosts())
        self.bridge = names["links"][0]
        self.bridge_address = str(hosts[BRIDGE_HOST - 1])

        _ip("link", "add", "name", self.bridge, "type", "bridge")
        self._made_links.append(self.bridge)
        # A fixed MAC: otherwise the bridge takes its ports' lowest one, changing as ports come.
        mac = "02:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(5))
        _ip("link", "set", "dev", self.bridge, "address", mac)
        _ip("addr", "add", f"{self.bridge_address}/{PREFIX_LEN}", "dev", self.bridge)
        _ip("link", "set", "dev", self.bridge, "up")

        for i in range(self.n_hosts):
            ns_name, root_link = names["netns"][i], names["links"][i + 1]
            address = str(hosts[FIRST_HOST - 1 + i])
            _ip("netns", "add", ns_name)
            self._made_netns.append(ns_name)
            _ip("link", "add", root_link, "type", "veth",
                "peer", "name", NS_INTERFACE, "netns", ns_name)  # fmt: skip
            self._made_links.append(root_link)
            _ip("link", "set", "dev", root_link, "master", self.bridge, "up")
            _ip("-n", ns_name, "addr", "add", f"{address}/{PREFIX_LEN}", "dev", NS_INTERFACE)
            _ip("-n", ns_name, "link", "set", "dev", NS_INTERFACE, "up")
            _ip("-n", ns_name, "link", "set", "dev", "lo", "up")
            self.hosts.append(Namespace(ns_name, address, root_link, i))

    # -------------------------------------------------------------- cleanup

    def leftovers(self) -> list[str]:
        """What this network created that still exists (namespaces, links, live processes)."""
        left = [f"netns {n}" for n in sorted(set(self._made_netns) & netns_names())]
        left += [f"link {n}" for n in sorted(set(self._made_links) & link_names())]
        left += [f"process {pid}" for ns in self.hosts for pid in ns.started_alive()]
        return left

    def close(self) -> None:
        """Kill every process in the namespaces, delete veths, namespaces and bridge; verify.

        Idempotent. Every step is tried even if an earlier one failed; raises NetnsError at the
        end if a step failed or something of this network is still there.
        """
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []

        def attempt(what: str, fn: Any, *args: Any) -> None:
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - collected and raised below
                errors.append(f"{what}: {exc}")

        present_netns = netns_names() if self._made_netns else set()
        for ns in self.hosts:
            if ns.name in present_netns:
                attempt(f"kill processes in {ns.name}", ns.kill_all)
        present_links = link_names() if self._made_links else set()
        # Deleting the root end of a veth pair deletes both ends at once (a deleted namespace
        # would take its end along only when the kernel gets round to destroying it).
        for link in reversed(self._made_links[1:]):
            if link in present_links:
                attempt(f"delete {link}", _ip, "link", "del", link)
        for name in reversed(self._made_netns):
            if name in present_netns:
                attempt(f"delete netns {name}", _ip, "netns", "del", name)
        if self._made_links and self._made_links[0] in present_links:
            attempt(f"delete {self._made_links[0]}", _ip, "link", "del", self._made_links[0])

        deadline = time.monotonic() + GONE_TIMEOUT_S
        left: list[str] = []
        while True:
            try:
                left = self.leftovers()
            except NetnsError as exc:
                errors.append(f"listing leftovers: {exc}")
                break
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        _OPEN.pop(id(self), None)
        if left:
            errors.append("left after cleanup: " + ", ".join(left))
        if errors:
            raise NetnsError(f"{self!r} cleanup: " + "; ".join(errors))
