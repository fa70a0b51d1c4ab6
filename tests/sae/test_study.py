"""The matched-L0 study (flows/sae_study.py): what it queues is a valid params sweep."""

import shutil

import pytest
import yaml
from dvc.utils.hydra import apply_overrides

from flows.sae_study import commands, study_saes
from stages.config import load_params, parse_params


def test_study_queues_one_valid_sweep_per_seed(tmp_path):
    raw = yaml.safe_load(open("params.yaml"))
    default = parse_params(raw).saes
    sweeps = {m: [g.model_dump(mode="json") for g in default.groups(m)] for m in default.sweep}
    cmds = commands(sweeps, seeds=[0, 1, 2])
    assert [c[:4] for c in cmds[:3]] == [["dvc", "exp", "run", "--queue"]] * 3
    assert cmds[-1] == ["dvc", "queue", "start", "-j", "1"]
    for seed, cmd in enumerate(cmds[:3]):
        assert cmd[-2:] == ["saes@toy-a", "saes@toy-b"]  # only the SAE stages re-run
        # what `dvc exp run -S` does to params.yaml: DVC's own Hydra override code
        path = shutil.copy("params.yaml", tmp_path / f"params-{seed}.yaml")
        apply_overrides(path, [a for a in cmd if a.startswith("saes.sweep.")])
        p = load_params(path)
        cfgs = [c for c in p.saes.plan("toy-a")["blocks.3.hook_resid_post"] if c.name]
        assert len(cfgs) == 5 * 3 and {c.seed for c in cfgs} == {seed}
        assert sorted(c.intended_l0 for c in cfgs) == sorted([8.0, 16.0, 32.0] * 5)
        # relu searches λ with short runs before its controller; the others do not
        assert {c.l0_control for c in cfgs if c.architecture == "relu"} == {"trend"}
        assert {c.architecture: c.calibration_runs for c in cfgs} == {
            "relu": 3,
            "gated": 0,
            "jumprelu": 0,
            "topk": 0,
            "batchtopk": 0,
        }
        # the default sweep is still there, unchanged
        assert p.saes.plan("toy-b") == {
            h: [*cs, *(cfgs if h == "blocks.3.hook_resid_post" else [])]
            for h, cs in default.plan("toy-b").items()
        }
    names = [e["name"] for s in (0, 1, 2) for e in study_saes(s)]
    assert len(set(names)) == 45


def test_widths_study_queues_topk_at_every_width(tmp_path):
    raw = yaml.safe_load(open("params.yaml"))
    default = parse_params(raw).saes
    sweeps = {m: [g.model_dump(mode="json") for g in default.groups(m)] for m in default.sweep}
    widths = [256, 512, 1024, 2048, 4096]
    cmds = commands(sweeps, seeds=[0, 1], widths=widths)
    assert [c[5] for c in cmds[:2]] == ["sae-widths-s0", "sae-widths-s1"]
    for seed, cmd in enumerate(cmds[:2]):
        path = shutil.copy("params.yaml", tmp_path / f"params-{seed}.yaml")
        apply_overrides(path, [a for a in cmd if a.startswith("saes.sweep.")])
        p = load_params(path)
        cfgs = [c for c in p.saes.plan("toy-a")["blocks.3.hook_resid_post"]
                if c.name and c.name.startswith("topk-w")]  # fmt: skip
        assert [(c.architecture, c.d_sae, c.k, c.seed) for c in cfgs] == [
            ("topk", w, 16, seed) for w in widths
        ]
        assert {c.n_training_tokens for c in cfgs} == {1_000_000}


def test_seeds_study_adds_the_headline_sae_at_other_seeds(tmp_path):
    """One experiment: the default sweep plus TopK k16 on blocks.3 at seeds 1 and 2,
    named like the default's folder; the seed groups of stages/sae/seeds.py find them."""
    from flows.sae_study import seed_commands
    from stages.sae.seeds import seed_groups

    raw = yaml.safe_load(open("params.yaml"))
    p0 = parse_params(raw)
    sweeps = {m: [g.model_dump(mode="json") for g in p0.saes.groups(m)] for m in p0.saes.sweep}
    widths = {m: p0.hook_width(m, "blocks.3.hook_resid_post") for m in sweeps}
    cmds = seed_commands(sweeps, [1, 2], hook_widths=widths)
    assert cmds[0][:6] == ["dvc", "exp", "run", "--queue", "-n", "sae-seeds"]
    assert cmds[0][-2:] == ["saes@toy-a", "saes@toy-b"] and len(cmds) == 2
    path = shutil.copy("params.yaml", tmp_path / "params-seeds.yaml")
    apply_overrides(path, [a for a in cmds[0] if a.startswith("saes.sweep.")])
    p = load_params(path)
    cfgs = p.saes.plan("toy-a")["blocks.3.hook_resid_post"]
    assert [c.name for c in cfgs if c.name] == ["topk-1024-k16-s1", "topk-1024-k16-s2"]
    named = {c.name or f"default-{i}": c.model_dump(mode="json") for i, c in enumerate(cfgs)}
    (group,) = seed_groups(named).values()
    assert len(group) == 3 and group[1:] == ["topk-1024-k16-s1", "topk-1024-k16-s2"]


def test_workspace_runs_each_seed_in_place_without_the_queue():
    sweeps = {"toy-a": [{"hooks": ["blocks.3.hook_resid_post"], "saes": []}]}
    cmds = commands(sweeps, seeds=[0, 1], queue=False)
    assert [c[:4] for c in cmds] == [["dvc", "exp", "run", "-n"]] * 2
    assert all("--queue" not in c and c[-1] == "saes@toy-a" for c in cmds)


def test_matched_table_against_hand_computed_rows(tmp_path):
    """Rows per (architecture, target) over seeds: L0 deviation from the target and the
    ±10 % verdict at every seed, mean ± sd of the metrics; other SAEs are left out."""
    from stages.report.sweep import SAERef
    from stages.sae.matched import matched_table

    def ref(name, arch, l0, fvu, k1=None):
        gt = {"sparse_probing": {"summary": {"k1_f1": {"mean": k1}}}} if k1 else {}
        return SAERef("toy-a", "h", name, tmp_path, arch,
                      {"l0": l0, "fvu": fvu, "ground_truth": gt})  # fmt: skip

    rows = matched_table([
        ref("relu-l0t16-s0", "relu", 15.2, 0.02, 0.4), ref("relu-l0t16-s1", "relu", 17.0, 0.04, 0.5),
        ref("topk-l0t8-s0", "topk", 8.0, 0.03), ref("gated-l0t32-s0", "gated", 27.0, 0.01),
        ref("topk-1024-k16", "topk", 16.0, 0.02),  # the default sweep's: not a study SAE
        ref("relu-l0t8-s0", "topk", 8.0, 0.02),  # name and architecture disagree: skipped
    ])  # fmt: skip
    assert [(r["architecture"], r["target_l0"]) for r in rows] == [
        ("topk", 8.0), ("relu", 16.0), ("gated", 32.0)]  # fmt: skip
    relu = rows[1]
    assert relu["seeds"] == [0, 1] and relu["l0"] == [15.2, 17.0]
    assert relu["max_deviation"] == pytest.approx(1 / 16) and relu["within_band"]
    assert relu["fvu"]["mean"] == pytest.approx(0.03)
    assert relu["fvu"]["sd"] == pytest.approx(0.02**0.5 / 10)
    assert relu["probe_k1_f1"]["mean"] == pytest.approx(0.45)
    gated = rows[2]
    assert gated["max_deviation"] == pytest.approx(5 / 32) and not gated["within_band"]
    assert gated["worst_deviation"] == pytest.approx(-5 / 32)
    assert rows[0]["fvu"]["sd"] is None  # one seed: no sd


def test_together_puts_every_seed_in_one_experiment():
    sweeps = {"toy-a": [{"hooks": ["blocks.3.hook_resid_post"], "saes": []}]}
    (cmd,) = commands(sweeps, seeds=[0, 1, 2], queue=False, together=True)
    assert cmd[cmd.index("-n") + 1] == "sae-study-s0-1-2"
    sweep = cmd[cmd.index("-S") + 1]
    assert all(f"-l0t8-s{s}" in sweep for s in (0, 1, 2)) and sweep.count("l0t") == 45
