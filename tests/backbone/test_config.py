"""params.yaml validation: every bad value stops with one line naming key, value, expectation."""

from __future__ import annotations

import pytest
import yaml

from stages.config import ParamsError, load_params, parse_params


def _err(raw: dict) -> str:
    with pytest.raises(ParamsError) as e:
        parse_params(raw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_valid_tiny_params_parse(tiny):
    p = parse_params(tiny)
    assert p.models["tiny-a"].arch.d_model == 32
    assert p.hooks("tiny-b") == ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]


def test_repo_params_file_is_valid():
    p = load_params("params.yaml")
    assert set(p.models) == {"toy-a", "toy-b"}


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (
            lambda r: r["models"]["tiny-a"]["arch"].update(d_model=-4),
            "models.tiny-a.arch.d_model = -4, expected a number >= 1",
        ),
        (
            lambda r: r["models"]["tiny-a"]["arch"].update(d_modl=4),
            "models.tiny-a.arch.d_modl: unknown key",
        ),
        (
            lambda r: r["models"]["tiny-a"].update(seed="x"),
            "models.tiny-a.seed = 'x', expected an integer",
        ),
        (lambda r: r["models"]["tiny-a"].update(source="bogus"), "models.tiny-a.source = 'bogus'"),
        (
            lambda r: r["activations"]["hooks"]["tiny-a"].append("blocks.7.hook_resid_post"),
            "activations.hooks.tiny-a[2] = 'blocks.7.hook_resid_post', expected a block index < n_layers = 2",
        ),
        (
            lambda r: r["activations"]["hooks"]["tiny-a"].append("blocks.0.hook_nonsense"),
            "expected a TransformerLens hook name",
        ),
        (
            lambda r: r["activations"]["hooks"].update({"ghost": ["hook_embed"]}),
            "activations.hooks.ghost = 'ghost', expected a model listed under models",
        ),
        (
            lambda r: r["activations"]["hooks"].pop("tiny-b"),
            "activations.hooks.tiny-b = None, expected a list of hooks",
        ),
        (
            lambda r: r["activations"]["store"].update(chunk_rows=1000),
            "chunk_rows = 1000 must divide shard_rows = 4096",
        ),
        (
            lambda r: r["corpus"].update(heldout_fraction=2),
            "corpus.heldout_fraction = 2, expected a number < 1",
        ),
        (
            lambda r: r["models"]["tiny-a"]["arch"].update(n_heads=3),
            "n_heads = 3 must divide d_model = 32",
        ),
        (
            lambda r: r["activations"]["store"].update(seq_len=64),
            "activations.store.seq_len = 64, expected <= models.tiny-a.arch.n_ctx = 32",
        ),
        (lambda r: r["corpus"].update(source="hf"), "no corpus.hf section"),
        (
            lambda r: r["align"]["transfer"].update(n_random=1),
            "align.transfer.n_random = 1, expected a number >= 2",
        ),
    ],
)
def test_bad_values_name_key_value_and_expectation(tiny, mutate, expected):
    mutate(tiny)
    assert expected in _err(tiny)


def test_model_listed_twice_is_refused(tmp_path, tiny):
    text = yaml.safe_dump(tiny)
    block = yaml.safe_dump({"tiny-a": tiny["models"]["tiny-a"]})
    dup = text.replace(
        "models:\n", "models:\n" + "".join("  " + ln + "\n" for ln in block.splitlines()), 1
    )
    f = tmp_path / "params.yaml"
    f.write_text(dup)
    with pytest.raises(ParamsError, match=r"key 'tiny-a' appears twice"):
        load_params(f)


def test_invalid_yaml_names_the_line(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("corpus:\n  source: toy\n models: [\n")
    with pytest.raises(ParamsError, match=r"params.yaml: line \d+: not valid YAML"):
        load_params(f)


def test_sae_sweep_groups_merge_per_hook(tiny):
    base = tiny["saes"]["sweep"]["tiny-a"]
    one = {"architecture": "topk", "expansion_factor": 2, "k": 2, "n_training_tokens": 4096,
           "batch_size": 512}  # fmt: skip
    tiny["saes"]["sweep"]["tiny-a"] = [
        base,
        {"hooks": ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"], "saes": [one]},
    ]
    p = parse_params(tiny)
    plan = p.sae_plan("tiny-a")
    assert list(plan) == ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    assert [c.display_name for c in plan["blocks.0.hook_resid_post"]] == [
        "topk-x4-k4", "relu-x4-l1c5", "topk-x2-k2"]  # fmt: skip
    assert [c.display_name for c in plan["blocks.1.hook_mlp_out"]] == ["topk-x2-k2"]
    # the same SAE twice on one hook would collide on its folder name
    tiny["saes"]["sweep"]["tiny-a"][1]["saes"] = [base["saes"][0]]
    assert "expected a unique SAE name per hook (blocks.0.hook_resid_post)" in _err(tiny)
    tiny["saes"]["sweep"]["tiny-a"][1] = {"hooks": ["blocks.1.hook_attn_out"], "saes": [one]}
    assert "saes.sweep.tiny-a[1].hooks[0] = 'blocks.1.hook_attn_out', expected one of" in _err(tiny)


def test_compute_runner_from_params_and_environment(monkeypatch):
    from stages.config import ComputeParams

    c = ComputeParams()
    assert c.runner == "local" and c.dask.n_workers == 2 and c.dask.address is None
    monkeypatch.setenv("ATLAS_RUNNER", "dask")
    monkeypatch.setenv("ATLAS_DASK_WORKERS", "3")
    e = c.with_env()
    assert (e.runner, e.dask.n_workers, e.dask.threads_per_worker) == ("dask", 3, 1)
    monkeypatch.setenv("ATLAS_DASK_WORKERS", "0")
    with pytest.raises(ParamsError, match="ATLAS_DASK_WORKERS = '0'"):
        c.with_env()
    monkeypatch.setenv("ATLAS_DASK_WORKERS", "2")
    monkeypatch.setenv("ATLAS_RUNNER", "ray")
    with pytest.raises(ParamsError, match="ATLAS_RUNNER = 'ray'.*'local' or 'dask'"):
        c.with_env()
    with pytest.raises(ParamsError, match="compute.runner"):
        parse_params({**yaml.safe_load(open("params.yaml")), "compute": {"runner": "spark"}})
