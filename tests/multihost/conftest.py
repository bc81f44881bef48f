"""Fixtures of the multi-host tests (see `tests.multihost.netns`).

- `network`: a factory, `network(n_hosts=3) -> Network`, already built; skips the test with
  `netns_available()`'s reason where namespaces cannot be made. Every network it made is closed
  when the test ends, passed, failed or errored (and at interpreter exit otherwise).
- Every test under tests/multihost is marked `multihost` and `slow` (`make test-slow` runs them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.multihost.netns import Network, netns_available

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.multihost)
            item.add_marker(pytest.mark.slow)  # several machines' processes on one: `make test-slow`


@pytest.fixture
def network() -> Iterator[Callable[..., Network]]:
    reason = netns_available()
    if reason is not None:
        pytest.skip(reason)
    made: list[Network] = []

    def make(n_hosts: int = 3) -> Network:
        net = Network(n_hosts)
        made.append(net)
        return net.start()

    yield make
    errors: list[Exception] = []
    for net in reversed(made):
        try:
            net.close()
        except Exception as exc:  # noqa: BLE001 - close the others, then report
            errors.append(exc)
    if errors:
        raise errors[0]
