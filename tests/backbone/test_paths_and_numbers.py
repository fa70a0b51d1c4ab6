"""Issue 20, items 1, 2 and 5: names that become paths never leave their root, outputs
never replace a folder elsewhere, and no knob of params.yaml is NaN, infinite or a
degenerate multiplier list."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages.config import ParamsError, load_params, parse_params
from stages.io import atomic_dir, replace_dir
from stages.layout import UnsafePathError, inside, safe_name


def _err(raw: dict) -> str:
    with pytest.raises(ParamsError) as e:
        parse_params(raw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------------------- layout


@pytest.mark.parametrize("name", ["..", "../canary", "/tmp/x", "a/b", ".git", "", "-rf", "a\x00b"])
def test_safe_name_refuses_names_that_are_not_one_folder(name):
    with pytest.raises(UnsafePathError, match=r"^where = .*expected a name of letters"):
        safe_name(name, "where")


@pytest.mark.parametrize("name", ["topk-1024-k16", "toy-a", "blocks.1.hook_resid_post", "a+b_c"])
def test_safe_name_keeps_ordinary_names(name):
    assert safe_name(name, "where") == name


def test_inside_refuses_a_path_outside_its_root(tmp_path):
    root = tmp_path / "data" / "saes"
    assert inside(root, "toy-a", "blocks.0.hook_resid_post", "topk") == root / "toy-a" / (
        "blocks.0.hook_resid_post/topk"
    )
    for parts in (("..", "..", "canary"), ("/etc",), ("toy-a", "../../x"), (".",)):
        with pytest.raises(UnsafePathError, match="outside"):
            inside(root, *parts)


def _canary(tmp_path: Path) -> Path:
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "keep.txt").write_text("precious")
    return canary


def test_atomic_dir_never_replaces_a_folder_outside_its_root(tmp_path):
    """The issue's reproduction: a set named '../../../canary' made the steering stage
    rename away and delete `canary/` at the repository root."""
    canary = _canary(tmp_path)
    steering = tmp_path / "data" / "steering" / "toy-a"
    steering.mkdir(parents=True)
    with pytest.raises(UnsafePathError, match="outside"):
        with atomic_dir(steering / "../../../canary", within=steering) as tmp:
            (tmp / "vector.safetensors").write_text("x")
    assert (canary / "keep.txt").read_text() == "precious"
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(UnsafePathError):
        replace_dir(src, canary, within=tmp_path / "data")
    assert (canary / "keep.txt").read_text() == "precious" and src.is_dir()


def test_atomic_dir_without_a_root_refuses_dotdot_cwd_and_git(tmp_path, monkeypatch):
    canary = _canary(tmp_path)
    (tmp_path / "repo" / ".git").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "repo")
    for target in (Path("data/../../canary"), Path("."), tmp_path, Path(".git")):
        with pytest.raises(UnsafePathError, match="refusing"):
            with atomic_dir(target):
                pass
    assert (canary / "keep.txt").read_text() == "precious"
    assert (tmp_path / "repo" / ".git").is_dir()
    with atomic_dir(Path("data/steering/ok")) as tmp:  # an ordinary output still works
        (tmp / "f").write_text("1")
    assert Path("data/steering/ok/f").read_text() == "1"


def test_a_prompt_set_header_name_that_climbs_out_is_refused(tmp_path):
    from stages.steering import read_set

    f = tmp_path / "evil.jsonl"
    lines = [{"kind": "header", "name": "../../../canary", "positive_targets": ["a"],
              "negative_targets": ["b"]},
             {"positive": "Love", "negative": "Hate"}, {"kind": "eval", "prompt": "I"}]  # fmt: skip
    f.write_text("".join(json.dumps(d) + "\n" for d in lines))
    with pytest.raises(ValueError) as e:
        read_set(f)
    assert str(e.value).startswith(f"{f}: line 1: 'name' = '../../../canary', expected a name")
    named_by_file = tmp_path / "my set.jsonl"  # no header name: the file name is the name
    named_by_file.write_text("".join(json.dumps(d) + "\n" for d in lines[1:]))
    with pytest.raises(ValueError, match=r"the set's name .* = 'my set', expected a name"):
        read_set(named_by_file)


def test_write_concept_refuses_a_name_outside_its_folder(tmp_path):
    """Library use (no read_set): the result's name still cannot leave the folders."""
    from types import SimpleNamespace

    from stages.steering.decompose_run import write_decomposition
    from stages.steering.run import write_concept

    canary = _canary(tmp_path)
    steering, decomposition = tmp_path / "s" / "m", tmp_path / "d" / "m"
    result = SimpleNamespace(name="../../canary")
    with pytest.raises(UnsafePathError):
        write_concept(result, steering)  # type: ignore[arg-type]
    with pytest.raises(UnsafePathError):
        write_decomposition({}, decomposition, "../../canary")
    assert (canary / "keep.txt").read_text() == "precious"


# ---------------------------------------------------------------------------- params


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (  # item 2: an SAE name is a folder under data/saes/<model>/<hook>/
            lambda r: r["saes"]["sweep"]["tiny-a"]["saes"][0].update(name="../../../canary2"),
            "saes.sweep.tiny-a.saes[0].name = '../../../canary2', expected a name of letters",
        ),
        (
            lambda r: r["saes"]["sweep"]["tiny-a"]["saes"][0].update(name="/tmp/canary2"),
            "saes.sweep.tiny-a.saes[0].name = '/tmp/canary2', expected a name of letters",
        ),
        (
            lambda r: r["models"].update({"../m": r["models"]["tiny-a"]}),
            "models.../m = '../m', expected a name of letters",
        ),
        (
            lambda r: r["align"]["config"].update(sae_names=["../x"]),
            "align.config.sae_names[0] = '../x', expected a name of letters",
        ),
        (
            lambda r: r["report"].update(dashboard_saes=["tiny-a/../../x"]),
            "report.dashboard_saes[0] = 'tiny-a/../../x', expected an SAE name or 'model/hook/name'",
        ),
        # item 5: nothing infinite or NaN, anywhere (typed keys and free-form mappings)
        (
            lambda r: r["steering"]["config"].update(kl_budget=float("inf")),
            "steering.config.kl_budget = inf, expected a finite number",
        ),
        (
            lambda r: r["steering"]["config"].update(kl_multiplier=float("inf")),
            "steering.config.kl_multiplier = inf, expected a finite number",
        ),
        (
            lambda r: r["saes"]["sweep"]["tiny-a"]["saes"][0].update(lr=float("inf")),
            "saes.sweep.tiny-a.saes[0].lr = inf, expected a finite number",
        ),
        (
            lambda r: r["models"]["tiny-a"]["train"].update(lr=float("nan")),
            "models.tiny-a.train.lr = nan, expected a finite number",
        ),
        (
            lambda r: r["align"]["config"].update(threshold=float("-inf")),
            "align.config.threshold = -inf, expected a finite number",
        ),
        (
            lambda r: r["steering"]["config"].update(multipliers=[-float("inf"), 0, float("inf")]),
            "steering.config.multipliers[0] = -inf, expected a finite number",
        ),
        (
            lambda r: r["steering"]["config"].update(multipliers=[0, 0, 0]),
            "steering.config.multipliers = [0.0, 0.0, 0.0], expected at least two distinct "
            "finite values",
        ),
    ],
)
def test_unsafe_names_and_non_finite_numbers_are_refused(tiny, mutate, expected):
    mutate(tiny)
    assert _err(tiny).startswith(f"params.yaml: {expected}")


def test_yaml_inf_and_nan_in_the_file_are_refused(tmp_path):
    text = Path("params.yaml").read_text()
    assert "kl_budget: 0.5" in text and "lr: 0.01," in text
    for old, new, key in (("kl_budget: 0.5", "kl_budget: .inf", "steering.config.kl_budget = inf"),
                          ("lr: 0.01,", "lr: .nan,", "models.toy-a.train.lr = nan")):  # fmt: skip
        p = tmp_path / "params.yaml"
        p.write_text(text.replace(old, new, 1))
        with pytest.raises(ParamsError) as e:
            load_params(p)
        assert str(e.value) == f"{p}: {key}, expected a finite number"


def test_concept_config_refuses_degenerate_multipliers():
    from stages.steering import ConceptConfig

    for m in ((0.0, 0.0, 0.0), (-float("inf"), 0.0, float("inf")), (1.0,)):
        with pytest.raises(ValueError, match="at least two distinct finite values"):
            ConceptConfig(multipliers=m)
    with pytest.raises(ValueError, match="kl_budget = inf"):
        ConceptConfig(kl_budget=float("inf"))
