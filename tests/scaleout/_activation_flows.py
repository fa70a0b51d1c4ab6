"""Runs the `activations@<model>` stage as `python -m flows.activations <model>` does
(`flows.common.main`: params check, one-line errors, exit codes), once per step, in one
process so that Prefect starts once. Run in a scratch project (cwd) by
tests/scaleout/test_remote_store.py:

    python -m tests.scaleout._activation_flows steps.json results.json

Each step writes params.yaml from `params.template.yaml` with its `activations.store.url`
(in place of `__URL__`, unchecked, so a bad one reaches the params check) and sets
`ATLAS_RUNNER`, runs the stage, records what it left, then may move the output aside.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def run_steps(steps: list[dict], model: str) -> list[dict]:
    from flows.activations import activations_flow
    from flows.common import main, with_runner

    results = []
    for i, step in enumerate(steps):
        template = Path("params.template.yaml").read_text()
        Path("params.yaml").write_text(template.replace("__URL__", json.dumps(step["url"])))
        os.environ["ATLAS_RUNNER"] = step["runner"]
        print(f"=== step {i}: {step}", flush=True)
        print(f"=== step {i}: {step}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            main(lambda: with_runner(activations_flow)(model), f"activations@{model}")
            rc = 0
        except SystemExit as e:
            rc = e.code
        acts, metrics = Path("data/activations"), Path(f"metrics/activations/{model}.json")
        left = sorted(str(p) for p in acts.rglob("*")) if acts.exists() else []
        results.append({"rc": rc, "left": left, "seconds": round(time.perf_counter() - t0, 1),
                        "metrics": json.loads(metrics.read_text()) if metrics.exists() else None})  # fmt: skip
        if step.get("move_to") and rc == 0:
            os.replace(f"data/activations/{model}", step["move_to"])
            metrics.unlink()
    return results


if __name__ == "__main__":
    steps = json.loads(Path(sys.argv[1]).read_text())
    Path(sys.argv[2]).write_text(json.dumps(run_steps(steps, "tiny"), indent=2))
