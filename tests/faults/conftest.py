"""Fixtures of the fault x state suite.

- `fault_root`: the directory of control files, exported as $SLUICE_TEST_FAULT_DIR for the rest
  of the session, so runners that the session's in-process worker spawns can read them (each job
  has its own subdirectory, so other tests' jobs are never steered).
- `jobs`: a `JobFactory` on the session's server and in-process worker; each case's job gets its
  own output and checkpoint directories under a directory of this module.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sluice.client import JobClient
from tests.faults.matrix import JobFactory
from tests.pipeline_functions import FAULT_DIR_ENV


@pytest.fixture(scope="session")
def fault_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("fault-controls")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FAULT_DIR_ENV, str(root))
        yield root


@pytest.fixture(scope="module")
def jobs(
    job_client: JobClient, fault_root: Path, worker: Any, tmp_path_factory: pytest.TempPathFactory
) -> JobFactory:
    return JobFactory(job_client, fault_root, tmp_path_factory.mktemp("faults"))
