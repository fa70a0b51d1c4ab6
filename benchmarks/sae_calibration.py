"""Sparsity calibration on cached activations: does each L1-family SAE end at its target
L0 (held-out, within ±10 %), and what does it cost against the same SAE without a target?

    python benchmarks/sae_calibration.py --store data/activations/toy-a \
        [--hook blocks.3.hook_resid_post] [--targets 16] [--archs relu,gated,jumprelu] \
        [--calibration-runs 0] [--seeds 0]

Settings as the default sweep (expansion 16, 1 M tokens, batch 4096, lr 1e-3). Prints one
JSON line per SAE: held-out L0, its error against the target, FVU, the coefficient the
run ended at, the calibration runs (coefficients tried, L0s reached) and the seconds, and
the seconds of the same SAE trained without a target (the control: added seconds =
difference). The wall time of one study SAE is the `seconds` of a line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.activations import ActivationStore  # noqa: E402
from stages.sae import train_saes  # noqa: E402

BASE = {"expansion_factor": 16, "n_training_tokens": 1_000_000, "batch_size": 4096,
        "lr": 0.001}  # fmt: skip


def held_out(sae, x: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        f = sae.encode(x)
        x_hat = sae.decode(f)
    l0 = float((f > 0).sum(-1).float().mean())
    fvu = float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    return l0, fvu


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--store", required=True)
    p.add_argument("--hook", default="blocks.3.hook_resid_post")
    p.add_argument("--targets", default="16")
    p.add_argument("--archs", default="relu,gated,jumprelu")
    p.add_argument("--calibration-runs", type=int, default=0)
    p.add_argument("--seeds", default="0")
    p.add_argument("--extra", default="{}", help="JSON merged into every targeted config")
    p.add_argument("--no-control", action="store_true", help="skip the untargeted control")
    a = p.parse_args()
    store = ActivationStore(Path(a.store))
    train = store.source(a.hook, "train")
    x = torch.from_numpy(store.source(a.hook, "heldout").read(0, 40_000)).float()
    print(json.dumps({"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                  "torch": torch.__version__}}))  # fmt: skip
    for arch in a.archs.split(","):
        for seed in map(int, a.seeds.split(",")):
            plain_s = None
            if not a.no_control:
                t0 = time.perf_counter()
                (r,) = train_saes(train, [{"architecture": arch, **BASE, "seed": seed}],
                                  progress=False)  # fmt: skip
                plain_s = time.perf_counter() - t0
                l0, fvu = held_out(r.sae, x)
                print(json.dumps({"arch": arch, "seed": seed, "target_l0": None,
                                  "heldout_l0": round(l0, 2), "fvu": round(fvu, 4),
                                  "seconds": round(plain_s, 1)}), flush=True)  # fmt: skip
            for t in map(float, a.targets.split(",")):
                cfg = {"architecture": arch, **BASE, "seed": seed, "target_l0": t,
                       "calibration_runs": a.calibration_runs, **json.loads(a.extra)}  # fmt: skip
                t0 = time.perf_counter()
                (r,) = train_saes(train, [cfg], progress=False)
                sec = time.perf_counter() - t0
                l0, fvu = held_out(r.sae, x)
                cal = r.sae.metadata["sparsity_calibration"]
                search = cal["search"]
                print(json.dumps({
                    "arch": arch, "extra": json.loads(a.extra), "seed": seed, "target_l0": t, "heldout_l0": round(l0, 2),
                    "rel_error": round(l0 / t - 1, 3), "within_10pct": abs(l0 / t - 1) <= 0.1,
                    "fvu": round(fvu, 4), "final_coefficient": round(cal["final_coefficient"], 5),
                    "calibration_runs": None if search is None else [
                        (round(q["coefficient"], 4), round(q["l0"], 1)) for q in search["runs"]],
                    "seconds": round(sec, 1),
                    "added_seconds": None if plain_s is None else round(sec - plain_s, 1),
                }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
