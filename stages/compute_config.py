"""`compute` in params.yaml: the runner (local or Dask), the device and the precision
(`stages/compute.py`).

Its own module, pydantic only, so that every stage's params check (stages/config.py)
reads it without importing torch.
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal

from pydantic import ValidationError, field_validator

from stages.params_messages import ParamsError, expected_for, walk
from stages.params_types import PosInt, StrictModel

# what `compute.device` may say; `stages.compute.resolve_device` reads it on the machine
DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class DaskParams(StrictModel):
    """A Dask cluster for the Prefect tasks (`prefect-dask`'s DaskTaskRunner)."""

    address: str | None = None  # an existing scheduler (tcp://host:8786); null: a local cluster
    n_workers: PosInt = 2  # local cluster size; also how many parts work is split into
    threads_per_worker: PosInt = 1


class ComputeParams(StrictModel):
    """Where the stages run (`stages/compute.py`). `runner` and `device` are not DVC
    dependencies: the runner does not change what is computed (the local and Dask paths
    write the same bytes; a test checks it), the device only the last bits. `precision`
    is a dependency of the stages whose numbers it changes (dvc.yaml)."""

    runner: Literal["local", "dask"] = "local"
    dask: DaskParams = DaskParams()
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["fp32", "bf16"] = "fp32"

    @field_validator("device")
    @classmethod
    def _device_spelling(cls, v: str) -> str:
        if not DEVICE_RE.match(v):
            raise ValueError("expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return v

    def with_env(self) -> ComputeParams:
        """Environment overrides, for one run without editing params.yaml:
        ATLAS_RUNNER, ATLAS_DASK_ADDRESS, ATLAS_DASK_WORKERS, ATLAS_DEVICE."""
        upd: dict[str, Any] = {}
        dask: dict[str, Any] = {}
        env = {"runner": "ATLAS_RUNNER", "device": "ATLAS_DEVICE",
               "address": "ATLAS_DASK_ADDRESS", "n_workers": "ATLAS_DASK_WORKERS"}  # fmt: skip
        for key, var in env.items():
            if v := os.environ.get(var):
                if key == "n_workers" and v.strip().isdigit():
                    v = int(v)  # type: ignore[assignment]  # strict: "3" is not an integer
                (dask if key in ("address", "n_workers") else upd)[key] = v
        if not upd and not dask:
            return self
        raw = self.model_dump()
        raw.update(upd)
        raw["dask"].update(dask)
        try:
            return ComputeParams.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            var = env[str(err["loc"][-1])]
            _, tp, metas, _ = walk(ComputeParams, err["loc"])
            raise ParamsError(f"environment: {var} = {os.environ[var]!r}, "
                              f"{expected_for(err, tp, metas)}") from None  # fmt: skip
