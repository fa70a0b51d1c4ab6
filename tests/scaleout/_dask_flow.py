"""A two-task flow on a 2-worker local Dask cluster through `flows.common.with_runner`,
run with no Prefect server configured (as a plain `dvc repro` does). Prints one JSON
line: the API each task run reported to, and the flow's. Used by test_dask_prefect.py:

    python -m tests.scaleout._dask_flow
"""

from __future__ import annotations

import json
import os

from flows.common import setup_env

# as every stage does (flows/__init__): Prefect's environment before prefect is imported,
# in particular 120 s instead of 20 s for the temporary server to start, which a fresh
# PREFECT_HOME's database migration overran under load
setup_env()

from prefect import flow, task  # noqa: E402


@task
def api_url() -> tuple[int, str | None]:
    from prefect.settings import PREFECT_API_URL

    return os.getpid(), PREFECT_API_URL.value()


@flow
def two_tasks() -> dict:
    from prefect.settings import PREFECT_API_URL

    futures = [api_url.submit() for _ in range(4)]
    return {"flow": PREFECT_API_URL.value(), "tasks": [f.result() for f in futures]}


if __name__ == "__main__":
    from flows.common import with_runner
    from stages.config import ComputeParams, DaskParams

    compute = ComputeParams(runner="dask", dask=DaskParams(n_workers=2, threads_per_worker=1))
    print("RESULT " + json.dumps(with_runner(two_tasks, compute)()), flush=True)
