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
            "models.tiny-a.arch.d_model = -4, expected an integer ≥ 1",
        ),
        (
            lambda r: r["models"]["tiny-a"]["arch"].update(d_modl=4),
            "models.tiny-a.arch.d_modl: unknown key, expected one of n_layers, d_model, n_heads,",
        ),
        (
            lambda r: r["models"]["tiny-a"].update(seed="x"),
            "models.tiny-a.seed = 'x', expected an integer",
        ),
        (
            lambda r: r["models"]["tiny-a"].update(source="bogus"),
            "models.tiny-a.source = 'bogus', expected 'toy' or 'pretrained'",
        ),
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
            "activations.hooks.tiny-b is missing, expected a list of hooks",
        ),
        (
            lambda r: r["activations"]["store"].update(chunk_rows=1000),
            "activations.store.chunk_rows = 1000, expected a divisor of shard_rows = 4096",
        ),
        (
            lambda r: r["corpus"].update(heldout_fraction=2),
            "corpus.heldout_fraction = 2, expected a number in (0, 1)",
        ),
        (
            lambda r: r["models"]["tiny-a"]["arch"].update(n_heads=3),
            "models.tiny-a.arch.n_heads = 3, expected a divisor of d_model = 32",
        ),
        (
            lambda r: r["activations"]["store"].update(seq_len=64),
            "activations.store.seq_len = 64, expected an integer ≤ models.tiny-a.arch.n_ctx = 32",
        ),
        (
            lambda r: r["corpus"].update(source="hf"),
            "corpus.hf is missing, expected an hf section when source is 'hf'",
        ),
        (
            lambda r: r["align"]["transfer"].update(n_random=1),
            "align.transfer.n_random = 1, expected an integer ≥ 2",
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


def test_exponent_floats_are_numbers_as_in_yaml_1_2(tmp_path, tiny):
    # PyYAML (YAML 1.1) alone reads `lr: 3e-4` as the string '3e-4', which strict
    # validation would refuse with "expected a number"
    text = yaml.safe_dump(tiny)
    lr = tiny["models"]["tiny-a"]["train"]["lr"]
    assert f"lr: {lr}\n" in text
    f = tmp_path / "params.yaml"
    f.write_text(text.replace(f"lr: {lr}\n", "lr: 3e-4\n", 1))
    assert load_params(f).models["tiny-a"].train.lr == 3e-4


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
    assert ("saes.sweep.tiny-a[1].saes[0]: expected a unique SAE name per hook, but "
            "saes.sweep.tiny-a[0].saes[0] also trains 'topk-128-k4' on blocks.0.hook_resid_post"
            in _err(tiny))  # fmt: skip
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
    # the variable, its value and the allowed values; no pydantic wording
    for var, value, expected in [
        ("ATLAS_DASK_WORKERS", "0", "expected an integer ≥ 1"),
        ("ATLAS_DASK_WORKERS", "two", "expected an integer ≥ 1"),
        ("ATLAS_RUNNER", "ray", "expected 'local' or 'dask'"),
        ("ATLAS_DEVICE", "gpu", "expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ]:
        with monkeypatch.context() as m:
            m.setenv(var, value)
            with pytest.raises(ParamsError) as e:
                c.with_env()
        assert str(e.value) == f"environment: {var} = {value!r}, {expected}"
    with pytest.raises(ParamsError, match="compute.runner"):
        parse_params({**yaml.safe_load(open("params.yaml")), "compute": {"runner": "spark"}})


def _sae(r: dict, i: int = 0, model: str = "tiny-a") -> dict:
    return r["saes"]["sweep"][model]["saes"][i]


def _second_group(r: dict, hook: str = "blocks.1.hook_mlp_out", **sae) -> None:
    if hook not in r["activations"]["hooks"]["tiny-a"]:
        r["activations"]["hooks"]["tiny-a"].append(hook)
    g = {"hooks": [hook], "saes": [{**_sae(r), **sae}]}
    r["saes"]["sweep"]["tiny-a"] = [r["saes"]["sweep"]["tiny-a"], g]


# Values the stages would only trip over hours later (after LM training and caching).
@pytest.mark.parametrize(
    "mutate, expected",
    [
        (  # k wider than the SAE: known from expansion_factor x the hook's width
            lambda r: _sae(r).update(k=500),
            "saes.sweep.tiny-a.saes[0].k = 500, expected at most d_sae = 128 "
            "(expansion_factor 4 × 32, the width of blocks.0.hook_resid_post)",
        ),
        (  # ... on a hook inside the MLP too (d_mlp = 64)
            lambda r: _second_group(r, "blocks.1.mlp.hook_post", k=300),
            "saes.sweep.tiny-a[1].saes[0].k = 300, expected at most d_sae = 256 "
            "(expansion_factor 4 × 64, the width of blocks.1.mlp.hook_post)",
        ),
        (
            lambda r: _sae(r).update(k=8, d_sae=5, expansion_factor=None),
            "saes.sweep.tiny-a.saes[0].k = 8, expected at most d_sae = 5",
        ),
        (  # BatchTopK has no check of its own
            lambda r: _sae(r).update(
                architecture="batchtopk", k=8.5, d_sae=5, expansion_factor=None
            ),
            "saes.sweep.tiny-a.saes[0].k = 8.5, expected at most d_sae = 5",
        ),
        (  # a target L0 the SAE cannot have: known from expansion_factor x the width
            lambda r: (_sae(r).pop("k"), _sae(r).update(architecture="relu", target_l0=128)),
            "saes.sweep.tiny-a.saes[0].target_l0 = 128, expected less than d_sae = 128 "
            "(expansion_factor 4 × 32, the width of blocks.0.hook_resid_post)",
        ),
        (  # TopK's L0 is k: a target would be silently ignored
            lambda r: _sae(r).update(target_l0=8),
            "saes.sweep.tiny-a.saes[0].target_l0 = 8, expected no target_l0 for a topk SAE "
            "(its L0 is set by k)",
        ),
        (
            lambda r: (_sae(r).pop("k"), _sae(r).update(architecture="jumprelu", target_l0=-2)),
            "saes.sweep.tiny-a.saes[0].target_l0 = -2, expected a number > 0",
        ),
        (
            lambda r: (
                _sae(r).pop("k"),
                _sae(r).update(architecture="gated", target_l0=4, calibration_tokens=10),
            ),
            "saes.sweep.tiny-a.saes[0].calibration_tokens = 10, expected at least one batch",
        ),  # fmt: skip
        (
            lambda r: _sae(r).update(d_in=7),
            "saes.sweep.tiny-a.saes[0].d_in = 7, expected the width of "
            "blocks.0.hook_resid_post, 32 (or no d_in)",
        ),
        (
            lambda r: r["steering"]["models"]["tiny-a"]["sets"].append("data/prompts/nope.jsonl"),
            "steering.models.tiny-a.sets[1] = 'data/prompts/nope.jsonl', expected an existing "
            "JSONL file (no such file; paths are relative to the repository root)",
        ),
        (
            lambda r: r["align"]["config"].update(sae_names=["topk-x4-k4"]),
            "align.config.sae_names[0] = 'topk-x4-k4', expected an SAE name of saes.sweep.tiny-a "
            "or saes.sweep.tiny-b (align.pairs.tiny-a__tiny-b): ['relu-128-l1c5', 'topk-128-k4']",
        ),
        (
            lambda r: r["align"]["config"].update(sae_names="topk-128-k4"),
            "align.config.sae_names = 'topk-128-k4', expected a list of SAE names, 'all' or null",
        ),
        (
            lambda r: r["align"]["config"].update(
                hook_pairs=[["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]]
            ),
            "align.config.hook_pairs[0][1] = 'blocks.1.hook_resid_post', expected a hook cached "
            "by tiny-b: ['blocks.0.hook_resid_post', 'blocks.1.hook_mlp_out']",
        ),  # fmt: skip
        (
            lambda r: r["report"].update(dashboard_saes=["topk-128-k4", "topk-x4-k4"]),
            "report.dashboard_saes[1] = 'topk-x4-k4', expected an SAE of saes.sweep, by name "
            "(relu-128-l1c5, topk-128-k4) or as 'model/hook/name'",
        ),
        (
            lambda r: r["report"].update(
                dashboard_saes=["tiny-b/blocks.1.hook_mlp_out/topk-128-k4"]
            ),
            "report.dashboard_saes[0] = 'tiny-b/blocks.1.hook_mlp_out/topk-128-k4', expected an SAE",
        ),
        (
            lambda r: r["activations"]["hooks"]["tiny-a"].append("blocks.1.attn.hook_z"),
            "activations.hooks.tiny-a[2] = 'blocks.1.attn.hook_z', expected a hook with one "
            "vector per token: it has per-head shape; cache a residual / MLP / attention output hook",
        ),
        (
            lambda r: r["activations"]["hooks"]["tiny-a"].append("blocks.0.attn.hook_pattern"),
            "activations.hooks.tiny-a[2] = 'blocks.0.attn.hook_pattern', expected a hook with one "
            "vector per token: it is an attention pattern, not a per-token activation",
        ),
        (
            lambda r: r["activations"]["hooks"]["tiny-a"].append("blocks.0.hook_mlp_in"),
            "activations.hooks.tiny-a[2] = 'blocks.0.hook_mlp_in', expected a hook with one "
            "vector per token: TransformerLens calls it only with use_hook_mlp_in",
        ),
        (
            lambda r: r["steering"]["models"]["tiny-a"]["hooks"].append("blocks.0.attn.hook_q"),
            "steering.models.tiny-a.hooks[1] = 'blocks.0.attn.hook_q', expected a hook with one "
            "vector per token: it has per-head shape",
        ),
        (
            lambda r: r["align"]["config"].update(threshold=2),
            "align.config.threshold = 2, expected a number in [-1, 1]",
        ),
        (
            lambda r: r["align"]["transfer"].update(min_correlation=-1.5),
            "align.transfer.min_correlation = -1.5, expected a number in [-1, 1] or null",
        ),
        (
            lambda r: r["align"].update(pairs={"tiny-a__tiny-a": {"a": "tiny-a", "b": "tiny-a"}}),
            "align.pairs.tiny-a__tiny-a.b = 'tiny-a', expected a model other than a = 'tiny-a'",
        ),
        (  # the same SAE given by width and by expansion: one folder, topk-128-k4
            lambda r: r["saes"]["sweep"]["tiny-a"]["saes"].append(
                {**_sae(r), "expansion_factor": None, "d_sae": 128}
            ),
            "saes.sweep.tiny-a.saes[2]: expected a unique SAE name per hook, but "
            "saes.sweep.tiny-a.saes[0] also trains 'topk-128-k4' on blocks.0.hook_resid_post "
            "(set `name` to tell them apart)",
        ),  # fmt: skip
    ],
)
def test_values_that_would_fail_in_a_later_stage_fail_now(tiny, mutate, expected):
    mutate(tiny)
    assert _err(tiny).startswith(f"params.yaml: {expected}")


def test_jsonl_steering_sets_that_exist_and_known_sae_names_pass(tiny, tmp_path):
    tiny["steering"]["models"]["tiny-a"]["sets"].append("data/prompts/sentiment_actadd.jsonl")
    tiny["report"]["dashboard_saes"] = [
        "relu-128-l1c5",
        "tiny-b/blocks.0.hook_resid_post/topk-128-k4",
    ]
    tiny["align"]["config"]["sae_names"] = ["topk-128-k4", "relu-128-l1c5"]
    parse_params(tiny)


def test_pretrained_hooks_are_checked_by_name_only(tiny):
    """A pretrained model's layer count and widths come with its config (network or HF
    cache): params can check hook names, not block indices or k against d_sae."""
    tiny["models"]["gpt2"] = {"source": "pretrained", "name": "gpt2"}
    tiny["activations"]["hooks"]["gpt2"] = ["blocks.40.hook_resid_post"]
    tiny["saes"]["sweep"]["gpt2"] = {"hooks": ["blocks.40.hook_resid_post"],
                                     "saes": [{**_sae(tiny), "k": 5000}]}  # fmt: skip
    tiny["report"]["dashboard_saes"] = ["topk-x4-k5000"]
    parse_params(tiny)
    tiny["activations"]["hooks"]["gpt2"] = ["blocks.40.attn.hook_v"]
    assert "gpt2[0] = 'blocks.40.attn.hook_v', expected a hook with one vector" in _err(tiny)


# Errors inside SAE entries, sweep groups and align.config read like every other one.
@pytest.mark.parametrize(
    "mutate, expected",
    [
        (
            lambda r: _sae(r).pop("n_training_tokens"),
            "saes.sweep.tiny-a.saes[0].n_training_tokens is missing, expected an integer ≥ 1",
        ),
        (lambda r: _sae(r).update(k=0), "saes.sweep.tiny-a.saes[0].k = 0, expected an integer ≥ 1"),
        (
            lambda r: _second_group(r, k=0),
            "saes.sweep.tiny-a[1].saes[0].k = 0, expected an integer ≥ 1",
        ),
        (
            lambda r: _sae(r, 1).update(l1_coef=0.1),
            "saes.sweep.tiny-a.saes[1].l1_coef: unknown key, expected one of architecture, name,",
        ),
        (
            lambda r: _sae(r).pop("architecture"),
            "saes.sweep.tiny-a.saes[0].architecture is missing, expected 'batchtopk', 'gated', "
            "'jumprelu', 'relu' or 'topk'",
        ),
        (
            lambda r: _sae(r).update(architecture="topk2"),
            "saes.sweep.tiny-a.saes[0].architecture = 'topk2', expected 'batchtopk', 'gated', "
            "'jumprelu', 'relu' or 'topk'",
        ),
        (
            lambda r: r["saes"]["sweep"]["tiny-a"].update(saes=_sae(r)),
            "saes.sweep.tiny-a.saes: expected a list, got a mapping",
        ),
        (
            lambda r: r["saes"]["sweep"]["tiny-a"].update(saes=["topk"]),
            "saes.sweep.tiny-a.saes[0] = 'topk', expected a mapping",
        ),
        (
            lambda r: r["saes"]["sweep"].update({"tiny-a": [r["saes"]["sweep"]["tiny-a"], "topk"]}),
            "saes.sweep.tiny-a[1] = 'topk', expected a mapping",
        ),
        (
            lambda r: r["align"]["config"].update(n_nulls=2),
            "align.config.n_nulls: unknown key, expected one of hook_pairs, sae_names, split,",
        ),
        (
            lambda r: r["align"]["config"].update(max_tokens="lots"),
            "align.config.max_tokens = 'lots', expected an integer",
        ),
        (
            lambda r: r["align"]["config"].update(max_tokens=1),
            "align.config.max_tokens = 1, expected an integer ≥ 2",
        ),
    ],
)
def test_nested_errors_read_like_the_others(tiny, mutate, expected):
    mutate(tiny)
    msg = _err(tiny)
    assert msg.startswith(f"params.yaml: {expected}")
    assert "Input should" not in msg and "SAESweep" not in msg and "{" not in msg


# Key paths keep every real key; only the tag pydantic adds for `source` is left out.
@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda r: r["corpus"]["toy"].update(n_docs=0), "corpus.toy.n_docs = 0, expected"),
        (
            lambda r: r["models"].update(toy={**r["models"]["tiny-a"], "seed": "x"}),
            "models.toy.seed = 'x', expected an integer",
        ),
        (
            lambda r: r["models"].update(
                pretrained={"source": "pretrained", "name": "gpt2", "dtype": "int8"}
            ),
            "models.pretrained.dtype = 'int8', expected 'float32', 'float16' or 'bfloat16'",
        ),  # fmt: skip
        (
            lambda r: r["models"]["tiny-a"]["train"].update(seq_len=64),
            "models.tiny-a.train.seq_len = 64, expected an integer ≤ arch.n_ctx = 32",
        ),
    ],
)
def test_key_paths_keep_keys_named_toy_or_pretrained(tiny, mutate, expected):
    mutate(tiny)
    assert _err(tiny).startswith(f"params.yaml: {expected}")


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (  # strict: a bool or a string where a number is expected is a mistake
            lambda r: r["models"]["tiny-a"]["arch"].update(d_model=True),
            "models.tiny-a.arch.d_model = True, expected an integer ≥ 1",
        ),
        (
            lambda r: r["corpus"]["toy"].update(n_docs="8"),
            "corpus.toy.n_docs = '8', expected an integer ≥ 1",
        ),
        (
            lambda r: r["report"]["dashboards"].update(concept_features=1),
            "report.dashboards.concept_features = 1, expected true or false",
        ),
        (
            lambda r: _sae(r).update(k=True),
            "saes.sweep.tiny-a.saes[0].k = True, expected an integer",
        ),
        (  # said once, not "steering.config: steering.config.multipliers = ..."
            lambda r: r["steering"]["config"].update(multipliers=[0, 1, 2]),
            "steering.config.multipliers = [0.0, 1.0, 2.0], expected a symmetric range around 0",
        ),
        (
            lambda r: r["steering"]["config"].update(n_random=1),
            "steering.config.n_random = 1, expected an integer ≥ 2 (the random-direction null",
        ),
        (lambda r: r.update(models={}), "models = {}, expected at least one model"),
        (
            lambda r: r.update(compute={"device": "gpu"}),
            "compute.device = 'gpu', expected 'auto', 'cpu', 'cuda' or 'cuda:N'",
        ),
    ],
)
def test_messages_say_each_thing_once_in_the_style_of_style_md(tiny, mutate, expected):
    mutate(tiny)
    assert _err(tiny).startswith(f"params.yaml: {expected}")


# ---------------------------------------------------------------- issue 20, item 12


def test_params_file_that_is_a_directory_is_one_line(tmp_path):
    (tmp_path / "params.yaml").mkdir()
    with pytest.raises(ParamsError) as e:
        load_params(tmp_path / "params.yaml")
    assert str(e.value) == (
        f"{tmp_path / 'params.yaml'}: is a directory, expected the pipeline's params file "
        "(a YAML file)"
    )


def test_params_file_that_is_not_utf8_is_one_line(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_bytes(b"corpus:\n  source: toy # caf\xe9\n")
    with pytest.raises(ParamsError, match=r"params.yaml: not UTF-8 text \(byte 0xe9 at offset"):
        load_params(f)


def test_yaml_merge_keys_work_as_in_dvc(tmp_path, tiny):
    # DVC reads params.yaml with ruamel, which applies merge keys; so do we: the anchor's
    # keys first, the mapping's own keys over them (seed 7 here, not tiny-a's 0)
    text = yaml.safe_dump(tiny, sort_keys=False)
    a = yaml.safe_dump({"tiny-a": tiny["models"]["tiny-a"]}, sort_keys=False)
    text = text.replace("  tiny-a:\n", "  tiny-a: &toy\n", 1)
    start = text.index("  tiny-b:\n", text.index("models:"))
    end = text.index("activations:")
    text = text[:start] + "  tiny-b:\n    <<: *toy\n    seed: 7\n" + text[end:]
    assert a and "<<: *toy" in text
    f = tmp_path / "params.yaml"
    f.write_text(text)
    p = load_params(f)
    assert p.models["tiny-b"].seed == 7
    assert p.models["tiny-b"].train == p.models["tiny-a"].train
    assert p.models["tiny-b"].arch.d_model == 32
    # a list of anchors, and a key repeated by the mapping itself is still refused
    f.write_text(text.replace("    <<: *toy\n", "    <<: [*toy]\n    seed: 1\n", 1))
    with pytest.raises(ParamsError, match=r"key 'seed' appears twice"):
        load_params(f)


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (
            lambda r: r["models"]["tiny-a"].update(seed=-1),
            "models.tiny-a.seed = -1, expected an integer in [0, 4294967296)",
        ),
        (
            lambda r: r["corpus"]["toy"].update(seed=-3),
            "corpus.toy.seed = -3, expected an integer in [0, 4294967296)",
        ),
        (
            lambda r: r["steering"]["config"].update(seed=2**40),
            "steering.config.seed = 1099511627776, expected an integer in [0, 4294967296)",
        ),
        (
            lambda r: _sae(r).update(seed=-1),
            "saes.sweep.tiny-a.saes[0].seed = -1, expected an integer in [0, 4294967296)",
        ),
        (
            lambda r: r["align"]["config"].update(seed=-1),
            "align.config.seed = -1, expected an integer ≥ 0",
        ),
        (  # both would train into the same folders; it failed in training
            lambda r: r["saes"]["sweep"]["tiny-a"]["hooks"].append("blocks.0.hook_resid_post"),
            "saes.sweep.tiny-a.hooks[1] = 'blocks.0.hook_resid_post', expected each hook once "
            "in a group (also saes.sweep.tiny-a.hooks[0])",
        ),
        (
            lambda r: (
                _second_group(r, "blocks.1.hook_mlp_out")
                or r["saes"]["sweep"]["tiny-a"][1]["hooks"].append("blocks.1.hook_mlp_out")
            ),
            "saes.sweep.tiny-a[1].hooks[1] = 'blocks.1.hook_mlp_out', expected each hook once "
            "in a group (also saes.sweep.tiny-a[1].hooks[0])",
        ),
    ],
)
def test_negative_seeds_and_repeated_sweep_hooks_are_refused_at_params_check(
    tiny, mutate, expected
):
    mutate(tiny)
    assert _err(tiny) == f"params.yaml: {expected}"
