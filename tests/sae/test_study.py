"""The matched-L0 study (flows/sae_study.py): what it queues is a valid params sweep."""

import json

import yaml

from flows.sae_study import commands, study_saes
from stages.config import parse_params


def test_study_queues_one_valid_sweep_per_seed():
    raw = yaml.safe_load(open("params.yaml"))
    default = parse_params(raw).saes
    sweeps = {m: [g.model_dump(mode="json") for g in default.groups(m)] for m in default.sweep}
    cmds = commands(sweeps, seeds=[0, 1, 2])
    assert [c[:4] for c in cmds[:3]] == [["dvc", "exp", "run", "--queue"]] * 3
    assert cmds[-1] == ["dvc", "queue", "start", "-j", "1"]
    for seed, cmd in enumerate(cmds[:3]):
        assert cmd[-2:] == ["saes@toy-a", "saes@toy-b"]  # only the SAE stages re-run
        sets = dict(a.split("=", 1) for a in cmd if a.startswith("saes.sweep."))
        for model, value in sets.items():
            raw["saes"]["sweep"][model.split(".")[-1]] = json.loads(value)
        p = parse_params(raw)  # as `dvc exp run -S` would write params.yaml
        cfgs = [c for c in p.saes.plan("toy-a")["blocks.3.hook_resid_post"] if c.name]
        assert len(cfgs) == 5 * 3 and {c.seed for c in cfgs} == {seed}
        assert sorted(c.intended_l0 for c in cfgs) == sorted([8.0, 16.0, 32.0] * 5)
        # the default sweep is still there, unchanged
        assert p.saes.plan("toy-b") == {
            h: [*cs, *(cfgs if h == "blocks.3.hook_resid_post" else [])]
            for h, cs in default.plan("toy-b").items()
        }
    names = [e["name"] for s in (0, 1, 2) for e in study_saes(s)]
    assert len(set(names)) == 45


def test_widths_study_queues_topk_at_every_width():
    raw = yaml.safe_load(open("params.yaml"))
    default = parse_params(raw).saes
    sweeps = {m: [g.model_dump(mode="json") for g in default.groups(m)] for m in default.sweep}
    widths = [256, 512, 1024, 2048, 4096]
    cmds = commands(sweeps, seeds=[0, 1], widths=widths)
    assert [c[5] for c in cmds[:2]] == ["sae-widths-s0", "sae-widths-s1"]
    for seed, cmd in enumerate(cmds[:2]):
        for a in cmd:
            if a.startswith("saes.sweep."):
                model, value = a.split("=", 1)
                raw["saes"]["sweep"][model.split(".")[-1]] = json.loads(value)
        p = parse_params(raw)
        cfgs = [c for c in p.saes.plan("toy-a")["blocks.3.hook_resid_post"]
                if c.name and c.name.startswith("topk-w")]  # fmt: skip
        assert [(c.architecture, c.d_sae, c.k, c.seed) for c in cfgs] == [
            ("topk", w, 16, seed) for w in widths
        ]
        assert {c.n_training_tokens for c in cfgs} == {1_000_000}
