"""The matched-L0 SAE study, as DVC experiments beside the default run (README, "The SAE
study").

    python -m flows.sae_study              # queue one experiment per seed and run the queue
    python -m flows.sae_study --dry-run    # print the dvc commands instead
    python -m flows.sae_study --seeds 0 --workspace   # one seed, here (dvc exp run, no queue)
    python -m flows.sae_study --summary data/saes/toy-a/blocks.3.hook_resid_post
                                           # its analysis: matched-L0 table (JSON) + figures
    python -m flows.sae_study --widths 256 512 1024 2048 4096   # the widths study instead
    python -m flows.sae_study --families data/saes/toy-a/blocks.3.hook_resid_post
                                           # its analysis: family table (JSON) + figures
    python -m flows.sae_study --headline-seeds 1 2   # the headline SAE at more seeds

Every architecture × every L0 target × every seed, on one hook of every model: TopK and
BatchTopK at k = target, relu / gated / jumprelu calibrated to `target_l0` = target
(stages/sae/calibrate.py; relu with 3 calibration runs first, `CALIBRATION`). Each seed is one `dvc exp run --queue` of the `saes@<model>`
stages only (the corpus, LMs and activations come from the DVC cache), with
`saes.sweep.<model>` set by `-S` to the default sweep plus a group of that seed's SAEs
(the default's SAEs stay: the other stages' params name them); `dvc queue start` then
runs them.
Each experiment's SAEs are MLflow child runs (tags `atlas.kind = sae`, params `sae.*`),
so the study compares in the MLflow UI; `dvc exp show` lists the experiments' metrics.

The widths study (`--widths`) queues, per seed, TopK at k = 16 at every width on the same
hook (names `topk-w<width>-k16-s<seed>`), same training settings; `--families <saes dir>`
then builds latent families across the widths found in that folder and matches them to
the planted hierarchy (`stages/sae/families.py`), writing `families.json` and one figure
per width ladder into `--out`. The report shows the same table when the study's SAEs are
in the default run's `data/saes/<model>/<hook>/`.

The seeds study (`--headline-seeds 1 2`) queues ONE experiment (`sae-seeds`) in which
the default sweep's headline SAE (TopK k = 16 on the hook) is trained again at each
given seed beside seed 0 (names `topk-1024-k16-s<seed>`): `saes@<model>` then writes the
seed group's mean ± sd and seed-to-seed overlap (`stages/sae/seeds.py`, `seeds.json`).
"""

from __future__ import annotations

import argparse
import json
import sys

from flows.overrides import hydra_value, run_dvc

ARCHITECTURES = ("topk", "batchtopk", "relu", "gated", "jumprelu")
L0_TARGETS = (8, 16, 32)
SEEDS = (0, 1, 2)
HOOK = "blocks.3.hook_resid_post"
# the default sweep's training settings (params.yaml), so study and default compare
WIDTHS = (256, 512, 1024, 2048, 4096)  # the widths study (--widths): TopK at k = WIDTH_K
WIDTH_K = 16
FAMILIES_OUT = "studies/families"
BASE = {"expansion_factor": 16, "n_training_tokens": 1_000_000, "batch_size": 4096,
        "lr": 0.001}  # fmt: skip
# relu searches λ with 3 short runs before its controller, which then steers L0 onto the
# target ("trend"): on toy-a FVU 0.35 / 0.47 / 0.046 at L0 8 / 16 / 32, 18 of 18 runs
# (2 models × 3 seeds) within ±10 %. relu's cheaper default, the "reference" controller
# alone, reaches 0.50 / 0.44 / 0.059 in half the time with 8-50 % of its latents dead;
# the reference controller after the search misses ±10 % at 8 (README, "The SAE study")
CALIBRATION = {"relu": {"calibration_runs": 3, "l0_control": "trend"}}


def study_saes(seed: int, targets=L0_TARGETS, architectures=ARCHITECTURES) -> list[dict]:
    """One seed's SAE entries for `saes.sweep.<model>`: every architecture at every target;
    names carry target and seed (`relu-l0t16-s1`), so seeds never share a folder."""
    out = []
    for arch in architectures:
        for t in targets:
            sparsity = {"k": t} if arch in ("topk", "batchtopk") else {"target_l0": t}
            sparsity.update(CALIBRATION.get(arch, {}))
            out.append({"architecture": arch, **BASE, **sparsity, "seed": seed,
                        "name": f"{arch}-l0t{t:g}-s{seed}"})  # fmt: skip
    return out


def width_saes(seed: int, widths=WIDTHS, k: int = WIDTH_K) -> list[dict]:
    """One seed's SAEs of the widths study: TopK at k at every width (d_sae), the default
    sweep's training settings otherwise; names `topk-w1024-k16-s0`."""
    base = {key: v for key, v in BASE.items() if key != "expansion_factor"}
    return [{"architecture": "topk", **base, "d_sae": int(w), "k": k, "seed": seed,
             "name": f"topk-w{int(w)}-k{k}-s{seed}"} for w in widths]  # fmt: skip


def commands(
    sweeps: dict[str, list[dict]],
    seeds=SEEDS,
    hook: str = HOOK,
    jobs: int = 1,
    widths: list[int] | None = None,
    queue: bool = True,
    together: bool = False,
) -> list[list[str]]:
    """The dvc commands that queue and run the study (the widths study when `widths` is
    given); `sweeps`: model -> its default sweep groups (params.yaml's `saes.sweep`, as
    plain data). `queue=False`: one `dvc exp run` per seed in this workspace instead.
    `together`: one experiment with every seed's SAEs (so one folder holds them all, for
    `--summary` over seeds and the report), instead of one per seed."""
    cmds = []
    models = list(sweeps)
    batches = [list(seeds)] if together else [[s] for s in seeds]
    for batch in batches:
        seed = batch[0] if len(batch) == 1 else "-".join(map(str, batch))
        saes = [e for s in batch for e in (width_saes(s, widths) if widths else study_saes(s))]
        study = {"hooks": [hook], "saes": saes}
        sets = [a for m in models
                for a in ("-S", f"saes.sweep.{m}={hydra_value([*sweeps[m], study])}")]  # fmt: skip
        stages = [f"saes@{m}" for m in models]
        name = f"sae-widths-s{seed}" if widths else f"sae-study-s{seed}"
        cmds.append(["dvc", "exp", "run", *(["--queue"] if queue else []), "-n", name, *sets,
                     *stages])  # fmt: skip
    if queue:
        cmds.append(["dvc", "queue", "start", "-j", str(jobs)])
    return cmds


def headline_seed_saes(groups: list[dict], seeds, hook: str = HOOK, k: int = WIDTH_K,
                       hook_width: int | None = None) -> list[dict]:  # fmt: skip
    """Copies of the default sweep's unnamed TopK k entry on `hook` at each of `seeds`,
    named like its folder plus `-s<seed>` (`topk-1024-k16-s1`; the width from `d_sae`, or
    `expansion_factor` × `hook_width`); an error when the sweep has no such entry."""
    for g in groups:
        if hook in g["hooks"]:
            for e in g["saes"]:
                if e["architecture"] == "topk" and e.get("k") == k and not e.get("name"):
                    width = e.get("d_sae") or (e.get("expansion_factor") or 0) * (hook_width or 0)
                    stem = f"topk-{int(width)}-k{k}" if width else f"topk-k{k}"
                    return [{**e, "seed": int(s), "name": f"{stem}-s{int(s)}"} for s in seeds]
    raise SystemExit(f"params.yaml: saes.sweep has no unnamed topk entry with k {k} on {hook}")


def seed_commands(sweeps: dict[str, list[dict]], seeds, hook: str = HOOK,
                  hook_widths: dict[str, int | None] | None = None) -> list[list[str]]:  # fmt: skip
    """One queued experiment (`sae-seeds`) with the headline SAE at `seeds` beside the
    default sweep on every model, then `dvc queue start`."""
    sets = []
    for m, groups in sweeps.items():
        extra = headline_seed_saes(groups, seeds, hook, hook_width=(hook_widths or {}).get(m))
        sets += ["-S", f"saes.sweep.{m}={hydra_value([*groups, {'hooks': [hook], 'saes': extra}])}"]
    stages = [f"saes@{m}" for m in sweeps]
    return [["dvc", "exp", "run", "--queue", "-n", "sae-seeds", *sets, *stages],
            ["dvc", "queue", "start", "-j", "1"]]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from stages.config import load_params

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--hook", default=HOOK)
    ap.add_argument("--jobs", type=int, default=1, help="experiments run at once")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument("--workspace", action="store_true",
                    help="dvc exp run in this workspace, one seed after another, not queued")  # fmt: skip
    ap.add_argument("--together", action="store_true",
                    help="one experiment with every seed's SAEs, not one per seed")  # fmt: skip
    ap.add_argument("--models", nargs="+", metavar="MODEL",
                    help="only these models' SAE stages (default: every model)")  # fmt: skip
    ap.add_argument("--summary", metavar="SAES_DIR",
                    help="the matched-L0 table and figures of the study's SAEs in "
                         "data/saes/<model>/<hook>/ instead")  # fmt: skip
    ap.add_argument("--widths", type=int, nargs="+",
                    help=f"queue the widths study instead (TopK k {WIDTH_K}), e.g. "
                         f"{' '.join(map(str, WIDTHS))}")  # fmt: skip
    ap.add_argument("--headline-seeds", type=int, nargs="+", metavar="SEED",
                    help=f"queue the headline SAE (TopK k {WIDTH_K}) at these extra seeds instead")  # fmt: skip
    ap.add_argument("--families", metavar="SAES_DIR",
                    help="analyse the width ladders in data/saes/<model>/<hook>/ instead")  # fmt: skip
    ap.add_argument("--store", help="activation store for --families "
                                    "(default data/activations/<model>)")  # fmt: skip
    ap.add_argument(
        "--out",
        default=FAMILIES_OUT,
        help="where --families (default studies/families) or --summary (default studies/sae) "
        "writes <model>/<hook>/ and its JSON and figures",
    )
    args = ap.parse_args(argv)
    if args.families:
        return families(args.families, args.store, args.out)
    if args.summary:
        return summary(args.summary, "studies/sae" if args.out == FAMILIES_OUT else args.out)
    p = load_params()
    models = args.models or list(p.models)
    unknown = sorted(set(models) - set(p.models))
    if unknown:
        raise SystemExit(f"--models: {unknown} not in params.yaml models {sorted(p.models)}")
    sweeps = {m: [g.model_dump(mode="json") for g in p.saes.groups(m)] for m in models}
    if args.headline_seeds:
        widths = {m: p.hook_width(m, args.hook) for m in p.models}
        cmds = seed_commands(sweeps, args.headline_seeds, args.hook, widths)
    else:
        cmds = commands(sweeps, args.seeds, args.hook, args.jobs, args.widths,
                        queue=not args.workspace, together=args.together)  # fmt: skip
    run_dvc(cmds, args.dry_run)
    return 0


def families(saes_dir: str, store: str | None, out: str) -> int:
    """The widths study's analysis: family table and figures for `saes_dir`
    (`data/saes/<model>/<hook>/`)."""
    from pathlib import Path

    from stages.activations import ActivationStore
    from stages.sae.families import families_figure, family_study, seed_summary

    folder = Path(saes_dir)
    if not folder.is_dir():
        raise SystemExit(f"--families {saes_dir}: not a folder; expected data/saes/<model>/<hook>")
    hook, model = folder.name, folder.parent.name
    store_dir = Path(store) if store else Path("data/activations") / model
    dirs = [d for d in sorted(folder.iterdir()) if (d / "cfg.json").exists()]
    result = family_study(dirs, ActivationStore(store_dir), hook)
    if not result:
        raise SystemExit(f"{folder}: no width ladder (≥ 2 widths of one config) among "
                         f"{[d.name for d in dirs]}")  # fmt: skip
    result["seeds"] = seed_summary(result)
    dest = Path(out) / model / hook
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "families.json").write_text(json.dumps(result, indent=1) + "\n")
    for key, lad in result["ladders"].items():
        families_figure(lad, f"{model} {hook} {key}").savefig(dest / f"families-{key}.png",
                                                             dpi=110)  # fmt: skip
    print(f"wrote {dest}/families.json and {len(result['ladders'])} figure(s)")
    return 0


def summary(saes_dir: str, out: str) -> int:
    """The matched-L0 study's analysis for `saes_dir` (`data/saes/<model>/<hook>/`):
    `matched_l0.json` (`matched_table`), the Pareto figure of the study's SAEs with the
    ±10 % bands, and the quality-against-probing figure, into `out/<model>/<hook>/`."""
    from pathlib import Path

    from stages.report.ground_truth import quality_figure
    from stages.report.sweep import discover_saes, pareto_figure
    from stages.sae.matched import matched_table

    folder = Path(saes_dir)
    if not folder.is_dir():
        raise SystemExit(f"--summary {saes_dir}: not a folder; expected data/saes/<model>/<hook>")
    hook, model = folder.name, folder.parent.name
    saes = [s for s in discover_saes(folder.parent.parent, [model]) if s.hook == hook]
    rows = matched_table(saes, ARCHITECTURES)
    if not rows:
        raise SystemExit(f"{folder}: no study SAEs (<arch>-l0t<target>-s<seed>) among "
                         f"{[s.name for s in saes]}; run python -m flows.sae_study first")  # fmt: skip
    study = [s for s in saes if any(s.name.endswith(f"-s{sd}") and "-l0t" in s.name
                                    for r in rows for sd in r["seeds"])]  # fmt: skip
    dest = Path(out) / model / hook
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "matched_l0.json").write_text(json.dumps(rows, indent=1) + "\n")
    pareto_figure(study, f"{model} {hook}: the matched-L0 study").savefig(dest / "pareto.png",
                                                                          dpi=110)  # fmt: skip
    quality_figure(study, f"{model} {hook}: study SAEs against k-sparse probing").savefig(
        dest / "quality.png", dpi=110)  # fmt: skip
    print("| architecture | target | L0 (seeds) | max dev. | FVU | ΔCE (nats) | dead | "
          "k=1 F1 | k=20 F1 |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip

    def ms(v: dict, d: int) -> str:
        if v["mean"] is None:
            return "–"
        return f"{v['mean']:.{d}f}" + (f" ± {v['sd']:.{d}f}" if v["sd"] is not None else "")

    for r in rows:
        l0 = ", ".join(f"{x:.2f}" for x in r["l0"] if x is not None)
        print(f"| {r['architecture']} | {r['target_l0']:g} | {l0} | "
              f"{100 * r['worst_deviation']:+.1f} % | {ms(r['fvu'], 4)} | {ms(r['ce_delta_sae'], 4)} | "
              f"{ms(r['dead_fraction'], 3)} | {ms(r['probe_k1_f1'], 3)} | {ms(r['probe_k20_f1'], 3)} |")  # fmt: skip
    inside = sum(r["within_band"] for r in rows)
    print(f"{inside} of {len(rows)} (architecture, target) cells within ±10 % at every seed; "
          f"wrote {dest}/matched_l0.json, pareto.png, quality.png")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
