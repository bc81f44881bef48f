"""The network-namespace harness itself: reachability, partitions, machine death, cleanup.

Every request here goes to an address of a namespace this test made, or to the bridge address
in the root namespace; proxies are bypassed.
"""

from __future__ import annotations

import http.server
import json
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.multihost import netns
from tests.multihost.netns import (
    Namespace,
    Network,
    link_names,
    netns_available,
    netns_names,
)
from tests.processes import pid_exists

PORT = 8080  # every namespace has its own ports, all free
READY_S = 10.0
CUT_TIMEOUT_S = 0.5

# Fetches each URL (argv[3:]) with a socket timeout of argv[1] s, retrying for up to argv[2] s;
# prints {url: body or "ERROR ..."} as JSON.
FETCH = r"""
import json, sys, time, urllib.request
timeout, wait = float(sys.argv[1]), float(sys.argv[2])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
out = {}
for url in sys.argv[3:]:
    deadline = time.monotonic() + wait
    while True:
        try:
            with opener.open(url, timeout=timeout) as resp:
                out[url] = resp.read().decode()
            break
        except OSError as exc:
            if time.monotonic() >= deadline:
                out[url] = f"ERROR {type(exc).__name__}: {exc}"
                break
            time.sleep(0.05)
print(json.dumps(out))
"""


def url(address: str, port: int = PORT) -> str:
    return f"http://{address}:{port}/whoami"


def fetch_from(ns: Namespace, urls: list[str], *, timeout: float, wait: float) -> dict[str, str]:
    done = ns.run([sys.executable, "-c", FETCH, str(timeout), str(wait), *urls], timeout=wait + 30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def fetch_from_root(address_url: str, *, timeout: float, wait: float) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + wait
    while True:
        try:
            with opener.open(address_url, timeout=timeout) as resp:
                return resp.read().decode()
        except OSError as exc:
            if time.monotonic() >= deadline:
                return f"ERROR {type(exc).__name__}: {exc}"
            time.sleep(0.05)


def serve_whoami(ns: Namespace, root: Path) -> None:
    """`python -m http.server` in `ns` on its address, serving /whoami = the host's name."""
    www = root / ns.name
    www.mkdir()
    (www / "whoami").write_text(ns.name)
    argv = [sys.executable, "-m", "http.server", str(PORT), "--bind", ns.address]
    ns.popen([*argv, "--directory", str(www)], log_path=root / f"{ns.name}.log")


@pytest.fixture
def root_server(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """Starts an HTTP server in this (root-namespace) process on an address: returns its URL."""
    servers: list[http.server.ThreadingHTTPServer] = []
    (tmp_path / "whoami").write_text("root")

    def start(address: str) -> str:
        def handler(*a):
            return http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))

        server = http.server.ThreadingHTTPServer((address, 0), handler)
        servers.append(server)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        return url(address, server.server_address[1])

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def requires_netns() -> None:
    reason = netns_available()
    if reason is not None:
        pytest.skip(reason)


def test_every_host_reaches_the_others_and_the_root(
    network: Callable[..., Network], root_server: Callable[[str], str], tmp_path: Path
) -> None:
    net = network(3)
    assert len({ns.address for ns in net} | {net.bridge_address}) == 4
    root_url = root_server(net.bridge_address)
    for ns in net:
        serve_whoami(ns, tmp_path)

    for ns in net:  # root -> every namespace
        assert fetch_from_root(url(ns.address), timeout=2, wait=READY_S) == ns.name
    for ns in net:  # every namespace -> the others and the root's bridge address
        others = [o for o in net if o is not ns]
        got = fetch_from(ns, [url(o.address) for o in others] + [root_url], timeout=2, wait=READY_S)
        assert got == {**{url(o.address): o.name for o in others}, root_url: "root"}


def test_cut_partitions_a_host_and_restore_heals_it(
    network: Callable[..., Network], root_server: Callable[[str], str], tmp_path: Path
) -> None:
    net = network(2)
    h0, h1 = net.hosts
    root_url = root_server(net.bridge_address)
    serve_whoami(h0, tmp_path)
    assert fetch_from(h1, [url(h0.address)], timeout=2, wait=READY_S) == {url(h0.address): h0.name}
    server_pids = h0.pids()
    assert server_pids

    h0.cut()
    assert h0.is_cut and not h1.is_cut
    cut_off = fetch_from(h1, [url(h0.address)], timeout=CUT_TIMEOUT_S, wait=0)
    assert cut_off[url(h0.address)].startswith("ERROR")
    assert fetch_from_root(url(h0.address), timeout=CUT_TIMEOUT_S, wait=0).startswith("ERROR")
    assert fetch_from(h0, [root_url], timeout=CUT_TIMEOUT_S, wait=0)[root_url].startswith("ERROR")
    assert fetch_from(h1, [root_url], timeout=2, wait=0) == {root_url: "root"}  # h1 unaffected
    assert h0.pids() == server_pids  # the partitioned machine keeps running

    h0.restore()
    assert not h0.is_cut
    assert fetch_from(h1, [url(h0.address)], timeout=2, wait=READY_S) == {url(h0.address): h0.name}
    assert fetch_from(h0, [root_url], timeout=2, wait=READY_S) == {root_url: "root"}


def test_kill_all_ends_every_process_of_that_host_only(network: Callable[..., Network]) -> None:
    net = network(2)
    h0, h1 = net.hosts
    shell = h0.popen(["sh", "-c", "sleep 60 & sleep 60 & wait"])
    python = h0.popen([sys.executable, "-c", "import time; time.sleep(60)"])
    other = h1.popen(["sleep", "60"])
    deadline = time.monotonic() + READY_S
    while len(h0.pids()) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    in_h0 = h0.pids()
    assert len(in_h0) == 4  # sh, its two sleeps, python
    assert {shell.pid, python.pid} <= set(in_h0)  # `ip netns exec` execs: the pid is the program
    assert h1.pids() == [other.pid]

    h0.kill_all()
    assert h0.pids() == []
    assert shell.returncode == python.returncode == -signal.SIGKILL
    assert not any(pid_exists(pid) for pid in in_h0)
    assert other.poll() is None and h1.pids() == [other.pid]


@pytest.mark.usefixtures("requires_netns")
def test_exit_removes_everything_even_after_a_failure() -> None:
    with pytest.raises(RuntimeError, match="the test failed"), Network(2) as net:
        namespaces = {ns.name for ns in net}
        links = {net.bridge} | {ns.root_link for ns in net}
        assert namespaces <= netns_names() and links <= link_names()
        procs = [ns.popen(["sleep", "60"]) for ns in net]
        raise RuntimeError("the test failed")
    assert not namespaces & netns_names()
    assert not links & link_names()
    assert all(proc.returncode == -signal.SIGKILL for proc in procs)
    assert net.leftovers() == []
    net.close()  # idempotent


@pytest.mark.usefixtures("requires_netns")
def test_networks_at_the_same_time_do_not_collide() -> None:
    with Network(1) as a, Network(1) as b:
        assert a.subnet is not None and b.subnet is not None
        assert not a.subnet.overlaps(b.subnet)
        assert a.bridge != b.bridge and a[0].name != b[0].name and a[0].root_link != b[0].root_link
        assert all(len(name) <= 15 for name in (a.bridge, b.bridge, a[0].root_link, b[0].root_link))


@pytest.mark.usefixtures("requires_netns")
def test_a_failed_build_removes_what_it_made(monkeypatch: pytest.MonkeyPatch) -> None:
    real_ip = netns._ip
    made: list[tuple[str, ...]] = []

    def failing_ip(*args: str, check: bool = True) -> Any:
        if args[:2] == ("netns", "add") and any(a[:2] == ("netns", "add") for a in made):
            raise netns.NetnsError("injected failure on the second namespace")
        made.append(args)
        return real_ip(*args, check=check)

    monkeypatch.setattr(netns, "_ip", failing_ip)
    net = Network(2)
    with pytest.raises(netns.NetnsError, match="injected"):
        net.start()
    monkeypatch.undo()
    assert len(net.hosts) == 1  # the bridge and the first host were made, then removed
    assert net.bridge not in link_names() and net.hosts[0].root_link not in link_names()
    assert net.hosts[0].name not in netns_names()
    assert net.leftovers() == []
