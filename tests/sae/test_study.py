"""The matched-L0 study (flows/sae_study.py): what it queues is a valid params sweep."""

import shutil

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
        # the default sweep is still there, unchanged
        assert p.saes.plan("toy-b") == {
            h: [*cs, *(cfgs if h == "blocks.3.hook_resid_post" else [])]
            for h, cs in default.plan("toy-b").items()
        }
    names = [e["name"] for s in (0, 1, 2) for e in study_saes(s)]
    assert len(set(names)) == 45
