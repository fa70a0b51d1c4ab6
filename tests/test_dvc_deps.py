"""dvc.yaml's code deps are exactly the project files each stage runs (tests/dvc_deps.py):
a code change that can alter a stage's outputs re-runs that stage, and only those."""

from __future__ import annotations

import textwrap

import yaml

from tests.dvc_deps import REPO, problems, rewrite, runs


def test_every_stage_declares_exactly_the_code_it_runs():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    bad = problems(dvc)
    assert not bad, (
        f"dvc.yaml code deps disagree with the imports: {bad}; "
        "run `python -m tests.dvc_deps --write`"
    )


def test_the_closure_follows_lazy_exports_and_function_level_imports():
    # the corpus stage runs the params check (stages/config.py and the SAE configs) but
    # none of the SAE maths, though stages/sae/__init__.py names the trainer lazily
    corpus = runs("flows.corpus")
    assert {"stages/config.py", "stages/sae/config.py", "stages/corpus.py"} <= set(corpus)
    assert "stages/sae/trainer.py" not in corpus and "stages/sae/topk.py" not in corpus
    # flows.saes imports the trainer inside a task function, through the lazy export
    saes = runs("flows.saes")
    assert {"stages/sae/trainer.py", "stages/sae/topk.py", "stages/activations/reader.py"} <= set(
        saes
    )
    # the alignment pass does not run the steering code (the transfer stage does), only
    # the steering section of the params schema (every stage checks the whole file)
    schema = {"stages/steering/__init__.py", "stages/steering/config.py"}
    align = runs("flows.align")
    assert schema <= set(align)
    assert not any(f.startswith("stages/steering/") and f not in schema for f in align)
    assert not any(f.startswith("stages/report/") and f not in
                   {"stages/report/__init__.py", "stages/report/config.py"} for f in align)  # fmt: skip
    assert "stages/steering/evaluate.py" in runs("flows.transfer")


def test_a_missing_dep_is_found_and_rewrite_puts_it_back():
    text = (REPO / "dvc.yaml").read_text()
    dropped = text.replace("        - stages/models.py\n", "", 1)
    assert dropped != text
    bad = problems(yaml.safe_load(dropped))
    assert any("stages/models.py" in p["missing"] for p in bad.values()), bad
    assert rewrite(dropped) == text


def test_a_dep_on_code_the_stage_never_runs_is_reported():
    dvc = yaml.safe_load(
        textwrap.dedent("""
        stages:
          corpus:
            cmd: python -m flows.corpus
            deps: [stages/report/build.py]
        """)
    )
    bad = problems(dvc)["corpus"]
    assert bad["extra"] == ["stages/report/build.py"]
    assert "stages/corpus.py" in bad["missing"]
