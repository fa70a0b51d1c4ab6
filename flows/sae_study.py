"""The matched-L0 SAE study, as DVC experiments beside the default run (README, "The SAE
study").

    python -m flows.sae_study              # queue one experiment per seed and run the queue
    python -m flows.sae_study --dry-run    # print the dvc commands instead

Every architecture × every L0 target × every seed, on one hook of every model: TopK and
BatchTopK at k = target, relu / gated / jumprelu calibrated to `target_l0` = target
(stages/sae/calibrate.py). Each seed is one `dvc exp run --queue` of the `saes@<model>`
stages only (the corpus, LMs and activations come from the DVC cache), with
`saes.sweep.<model>` set by `-S` to the default sweep plus a group of that seed's SAEs
(the default's SAEs stay: the other stages' params name them); `dvc queue start` then
runs them.
Each experiment's SAEs are MLflow child runs (tags `atlas.kind = sae`, params `sae.*`),
so the study compares in the MLflow UI; `dvc exp show` lists the experiments' metrics.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

from flows.overrides import hydra_value

ARCHITECTURES = ("topk", "batchtopk", "relu", "gated", "jumprelu")
L0_TARGETS = (8, 16, 32)
SEEDS = (0, 1, 2)
HOOK = "blocks.3.hook_resid_post"
# the default sweep's training settings (params.yaml), so study and default compare
BASE = {"expansion_factor": 16, "n_training_tokens": 1_000_000, "batch_size": 4096,
        "lr": 0.001}  # fmt: skip


def study_saes(seed: int, targets=L0_TARGETS, architectures=ARCHITECTURES) -> list[dict]:
    """One seed's SAE entries for `saes.sweep.<model>`: every architecture at every target;
    names carry target and seed (`relu-l0t16-s1`), so seeds never share a folder."""
    out = []
    for arch in architectures:
        for t in targets:
            sparsity = {"k": t} if arch in ("topk", "batchtopk") else {"target_l0": t}
            out.append({"architecture": arch, **BASE, **sparsity, "seed": seed,
                        "name": f"{arch}-l0t{t:g}-s{seed}"})  # fmt: skip
    return out


def commands(
    sweeps: dict[str, list[dict]], seeds=SEEDS, hook: str = HOOK, jobs: int = 1
) -> list[list[str]]:
    """The dvc commands that queue and run the study; `sweeps`: model -> its default
    sweep groups (params.yaml's `saes.sweep`, as plain data)."""
    cmds = []
    models = list(sweeps)
    for seed in seeds:
        study = {"hooks": [hook], "saes": study_saes(seed)}
        sets = [a for m in models
                for a in ("-S", f"saes.sweep.{m}={hydra_value([*sweeps[m], study])}")]  # fmt: skip
        stages = [f"saes@{m}" for m in models]
        cmds.append(["dvc", "exp", "run", "--queue", "-n", f"sae-study-s{seed}", *sets, *stages])
    cmds.append(["dvc", "queue", "start", "-j", str(jobs)])
    return cmds


def main(argv: list[str] | None = None) -> int:
    from stages.config import load_params

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--hook", default=HOOK)
    ap.add_argument("--jobs", type=int, default=1, help="experiments run at once")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = ap.parse_args(argv)
    p = load_params()
    sweeps = {m: [g.model_dump(mode="json") for g in p.saes.groups(m)] for m in p.models}
    for cmd in commands(sweeps, args.seeds, args.hook, args.jobs):
        print(shlex.join(cmd))
        if not args.dry_run:
            subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
