"""The seed study (flows/seed_study.py): its `-S` overrides, applied to the real
params.yaml by DVC's own Hydra override code, give params that the pipeline's schema
accepts, with one more toy model (toy-a's params, another seed) and every pair."""

import importlib.metadata
import itertools
import shutil

import pytest
import yaml
from dvc.exceptions import InvalidArgumentError
from dvc.utils.hydra import apply_overrides

from flows.overrides import hydra_value, run_dvc
from flows.seed_study import commands, overrides
from stages.config import PARAMS_FILE, _UniqueKeyLoader, load_params

HOOKS = [f"blocks.{i}.hook_resid_post" for i in range(4)]


def _raw() -> dict:
    return yaml.load(PARAMS_FILE.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506


def _applied(tmp_path, overrides_):
    path = shutil.copy(PARAMS_FILE, tmp_path / "params.yaml")
    apply_overrides(path, overrides_)  # what `dvc exp run -S` does to params.yaml
    return load_params(path), yaml.load(open(path).read(), Loader=_UniqueKeyLoader)  # noqa: S506


def test_overrides_add_a_seed_model_and_every_pair(tmp_path):
    raw = _raw()
    before = load_params()
    p, new = _applied(tmp_path, overrides(raw, seeds=[2]))
    assert list(p.models) == ["toy-a", "toy-b", "toy-s2"]
    # exactly toy-a's params but the seed
    assert new["models"]["toy-s2"] == {**raw["models"]["toy-a"], "seed": 2}
    assert p.models["toy-s2"].seed == 2
    assert p.hooks("toy-s2") == HOOKS
    # only the SAE alignment, steering and geometry read: topk-1024-k16 on every hook
    assert p.sae_folders("toy-s2") == {h: ["topk-1024-k16"] for h in HOOKS}
    assert [(c.architecture, c.k, c.seed) for c in p.sae_plan("toy-s2")[HOOKS[0]]] == [
        ("topk", 16, 0)
    ]
    assert new["steering"]["models"]["toy-s2"] == raw["steering"]["models"]["toy-a"]
    pairs = {(v.a, v.b) for v in p.align.pairs.values()}
    assert pairs == set(itertools.combinations(["toy-a", "toy-b", "toy-s2"], 2))
    assert set(p.align.pairs) == {"toy-a__toy-b", "toy-a__toy-s2", "toy-b__toy-s2"}
    # the default models' params are untouched: DVC takes their outputs from the cache
    for m in ("toy-a", "toy-b"):
        assert p.models[m] == before.models[m]
        assert p.sae_plan(m) == before.sae_plan(m)
        assert p.hooks(m) == before.hooks(m)
    assert p.align.pairs["toy-a__toy-b"] == before.align.pairs["toy-a__toy-b"]
    assert p.align.config == before.align.config


def test_two_seeds_give_six_pairs(tmp_path):
    p, _ = _applied(tmp_path, overrides(_raw(), seeds=[2, 3]))
    assert len(p.align.pairs) == 6 and [p.models[m].seed for m in p.models] == [0, 1, 2, 3]


def test_bad_seed_or_override_fails(tmp_path):
    with pytest.raises(ValueError, match="toy-a already has it"):
        overrides(_raw(), seeds=[0])
    # JSON is not Hydra's grammar: a quoted dict key does not parse
    bad = '+align.pairs.toy-a__toy-s2={"a": "toy-a", "b": "toy-s2"}'
    with pytest.raises(InvalidArgumentError):
        _applied(tmp_path, [bad])
    # a pair naming a model that params.yaml lacks: the schema refuses it
    from stages.config import ParamsError

    with pytest.raises(ParamsError, match="toy-s9"):
        _applied(
            tmp_path, [f"+align.pairs.toy-a__toy-s9={hydra_value({'a': 'toy-a', 'b': 'toy-s9'})}"]
        )


def test_hydra_value_round_trips_strings_that_look_like_other_types(tmp_path):
    v = {"s": ["1e-3", "true", "null", "a b", 'q"uote'], "n": [1, 0.001, 1e-05, True, None],
         "blocks.0.hook_resid_post": {"k": "topk-1024-k16"}}  # fmt: skip
    path = tmp_path / "x.yaml"
    path.write_text("x: {}\n")
    apply_overrides(path, [f"+x.y={hydra_value(v)}"])
    # read as every stage reads params.yaml (YAML 1.2 numbers: 1e-05 is a float)
    assert yaml.load(path.read_text(), Loader=_UniqueKeyLoader)["x"]["y"] == v  # noqa: S506


def test_commands_queue_or_workspace():
    q = commands(_raw())
    assert q[0][:6] == ["dvc", "exp", "run", "--queue", "-n", "seed-study"]
    assert q[1] == ["dvc", "queue", "start", "-j", "1"]
    w = commands(_raw(), queue=False)
    assert len(w) == 1 and "--queue" not in w[0] and w[0].count("-S") == 7


def test_untrained_controls_are_models_with_no_training_paired_across_seeds(tmp_path):
    raw = _raw()
    p, new = _applied(tmp_path, overrides(raw, seeds=[], untrained=[0, 1]))
    assert list(p.models) == ["toy-a", "toy-b", "toy-u0", "toy-u1"]
    assert new["models"]["toy-u1"]["train"] == {**raw["models"]["toy-a"]["train"], "tokens": 0}
    assert p.models["toy-u0"].seed == 0 and p.models["toy-u1"].train.tokens == 0
    assert p.sae_folders("toy-u0") == {h: ["topk-1024-k16"] for h in HOOKS}
    # pairs of different seeds only: the untrained pair and trained vs untrained
    assert set(p.align.pairs) == {"toy-a__toy-b", "toy-a__toy-u1", "toy-b__toy-u0",
                                  "toy-u0__toy-u1"}  # fmt: skip
    with pytest.raises(ValueError, match="toy-u0"):
        overrides(new, seeds=[], untrained=[0])  # already there


def test_cross_tokenizer_models_get_another_vocabulary_and_pair_with_every_model(tmp_path):
    raw = _raw()
    p, new = _applied(tmp_path, overrides(raw, seeds=[2], cross_tokenizer=[3]))
    assert list(p.models) == ["toy-a", "toy-b", "toy-s2", "toy-s3-v512"]
    m = new["models"]["toy-s3-v512"]
    assert m == {**raw["models"]["toy-a"], "seed": 3, "tokenizer": {"vocab_size": 512}}
    assert p.models["toy-s3-v512"].tokenizer.vocab_size == 512
    # same SAEs (folder names follow d_model, not the vocabulary) and hooks as the others
    assert p.sae_folders("toy-s3-v512") == {h: ["topk-1024-k16"] for h in HOOKS}
    assert len(p.align.pairs) == 6 and "toy-s2__toy-s3-v512" in p.align.pairs
    with pytest.raises(ValueError, match="one seed twice"):
        overrides(raw, seeds=[2], cross_tokenizer=[2])
    with pytest.raises(ValueError, match="--vocab 1024"):
        overrides(raw, seeds=[], cross_tokenizer=[3], vocab=1024)


def test_the_study_plans_transfer_draws_for_its_holm_family(tmp_path):
    """m trained pairs × concepts × hooks tests in one Holm family at 0.05: a strong
    transfer's empirical p (floor 1 / (extend_to + 1)) must go below 0.05 / m."""
    raw = _raw()
    p, new = _applied(tmp_path, overrides(raw, seeds=[2]))
    assert p.align.transfer.extend_to == 360  # 3 pairs × 3 sets × 2 hooks = 18 tests
    assert 18 / (p.align.transfer.extend_to + 1) < 0.05 <= 18 / p.align.transfer.extend_to
    assert new["align"]["transfer"]["n_random"] == raw["align"]["transfer"]["n_random"]
    (tmp_path / "6").mkdir(), (tmp_path / "u").mkdir()
    p6, _ = _applied(tmp_path / "6", overrides(raw, seeds=[2], cross_tokenizer=[3]))
    assert p6.align.transfer.extend_to == 720  # 6 pairs: 36 tests
    # untrained control pairs stay out of the family: 1 trained pair, 6 tests, and the
    # default cap (4 × 32 = 128 draws, 6 / 129 < 0.05) already suffices
    pu, _ = _applied(tmp_path / "u", overrides(raw, seeds=[], untrained=[0, 1]))
    assert pu.align.transfer.extend_to is None


def test_run_dvc_runs_this_interpreters_dvc_without_it_on_path(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("PATH", "")  # a venv that is not activated: no `dvc`, no `python`
    run_dvc([["dvc", "--version"]])
    out = capfd.readouterr().out.splitlines()
    assert out[0] == "dvc --version"  # the command as a user would type it
    assert out[1] == importlib.metadata.version("dvc")
    # a stage's `python -m ...` is this interpreter too (it can import dvc)
    monkeypatch.chdir(tmp_path)
    run_dvc([["dvc", "init", "--no-scm", "-q"]])
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  s:\n    cmd: python -c \"import dvc; open('out', 'w').write('ok')\"\n"
        "    outs: [out]\n"
    )
    run_dvc([["dvc", "repro", "-q"]])
    assert (tmp_path / "out").read_text() == "ok"


def test_run_dvc_stops_at_a_failing_command_with_one_line(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)  # not a DVC repository: `dvc exp run` fails
    with pytest.raises(SystemExit) as e:
        run_dvc([["dvc", "exp", "run", "-n", "x"], ["dvc", "--version"]])
    msg = str(e.value.code)
    assert msg.startswith("error: `dvc exp run -n ...` exited with ") and "\n" not in msg
    assert "dvc --version" not in capfd.readouterr().out  # the rest did not run


def test_run_dvc_dry_run_prints_only_and_refuses_other_commands(capfd):
    run_dvc([["dvc", "no-such-command", "--flag"]], dry_run=True)
    assert capfd.readouterr().out == "dvc no-such-command --flag\n"
    with pytest.raises(ValueError, match="is not a dvc command"):
        run_dvc([["rm", "-rf", "data"]])
