"""The real-model profile (profiles/gpt2-pythia.yaml), offline, end to end.

The very params file a researcher runs with the hub, with only sizes and layer numbers
shrunk, run by `dvc repro` (what `atlas run` runs) against an HF cache holding tiny
random models of the same architectures (a GPT-2 and a GPT-NeoX, saved with
`transformers`) and SAELens-format SAEs at the repos and folders SAELens' registry names for the profile's
releases. Nothing is mocked: TransformerLens' `from_pretrained`, SAELens'
`SAE.from_pretrained` and HF `datasets` (streaming local text files) read a fake cache.

Every stage of the profile's DAG runs: corpus, lm, activations, saes, steering, decompose
(both models), align and transfer (gpt2 -> pythia across hook names), geometry (which
skips itself in one line: an HF corpus has no concept labels) and report (dashboards of
the published SAEs), then `atlas features` on a published SAE.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.backbone import _fake_hf_cache
from tests.backbone.conftest import REPO, run, scratch_project

pytestmark = pytest.mark.slow

PROFILE = REPO / "profiles/gpt2-pythia.yaml"
# the tiny models have 2 layers: the profile's layers, mapped onto them
PAIR = "gpt2__pythia-70m-deduped"
LAYERS = {"gpt2": {"6": "0", "8": "1"}, "pythia": {"2": "0", "3": "1"}}


def shrunk_profile(corpus_file: Path, local_sae: Path) -> dict:
    text = PROFILE.read_text()
    for old, new in {**LAYERS["gpt2"], **LAYERS["pythia"]}.items():
        text = text.replace(f"blocks.{old}.", f"blocks.{new}.")
    p = yaml.safe_load(text)
    # the same HF datasets builder, streamed, over a local file instead of the hub
    p["corpus"]["hf"] = {"path": "text", "data_files": [str(corpus_file)], "streaming": True,
                         "max_docs": 400}  # fmt: skip
    p["corpus"]["heldout_fraction"] = 0.1
    p["activations"]["store"] = {"seq_len": 32, "batch_size": 16, "shard_rows": 4096,
                                 "chunk_rows": 1024}  # fmt: skip
    p["saes"]["eval"] = {"max_rows": 2048, "ce_windows": 8}
    # the other source: a local SAELens-format folder
    p["saes"]["pretrained"]["gpt2"]["local"] = {"hook": "blocks.1.hook_resid_pre",
                                                "path": str(local_sae)}  # fmt: skip
    p["steering"]["config"].update(multipliers=[-4, -2, 0, 2, 4], n_windows=8, max_features=8,
                                   targeted_k=3, n_generations=1, max_new_tokens=4)  # fmt: skip
    p["align"]["config"].update(max_tokens=4000, n_permutations=10, n_samples=256,
                                self_check_tokens=1024)  # fmt: skip
    return p


def _texts() -> list[str]:
    """What the tiny tokenizers are trained on: the steering sets' own text (so that
    ' love' and 'A' are tokens, as in GPT-2's vocabulary) and everyday sentences."""
    lines = []
    for f in sorted((REPO / "data/prompts").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            d = json.loads(line)
            lines += [v for k, v in d.items() if k in ("positive", "negative", "prompt")]
            lines += [
                " " + w for k in ("positive_targets", "negative_targets") for w in d.get(k) or []
            ]
    return lines * 4


def test_real_profile_offline(tmp_path, prefect_api):
    hf = tmp_path / "hf"
    texts = _texts()
    _fake_hf_cache.build(hf, texts=texts, vocab_size=600, n_ctx=256)  # CAA prompts: ~70 tokens
    _fake_hf_cache.build_pythia(hf, texts=texts[::-1], vocab_size=500)
    prof = yaml.safe_load(PROFILE.read_text())
    for model, entries in prof["saes"]["pretrained"].items():
        m = "gpt2" if model == "gpt2" else "pythia"
        for e in entries.values():
            hook = e["hook"]
            for old, new in LAYERS[m].items():
                hook = hook.replace(f"blocks.{old}.", f"blocks.{new}.")
            _fake_hf_cache.add_sae_release(hf, e["release"], hook, hook=hook, d_sae=96,
                                           d_in=32 if m == "gpt2" else 64)  # fmt: skip
    local = tmp_path / "local-sae"
    _fake_hf_cache.copy_sae(hf, "gpt2-small-res-jb", "blocks.1.hook_resid_pre", local)
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n".join(texts[:400]) + "\n")
    root = tmp_path / "proj"
    root.mkdir()
    params = shrunk_profile(corpus, local)
    env = scratch_project(root, params, prefect_api, HF_HOME=str(hf), HF_HUB_OFFLINE="1",
                          HF_DATASETS_OFFLINE="1")  # fmt: skip
    models = ("gpt2", "pythia-70m-deduped")
    # the documented command (`cp profiles/gpt2-pythia.yaml params.yaml && atlas run` runs
    # `dvc repro`): every stage of the DAG, as DVC orders it, with the project's DVC settings
    run(["git", "init", "-q"], root, env)
    run(["dvc", "init", "-q"], root, env)
    for f in (".dvc/config", ".dvcignore"):
        shutil.copy(REPO / f, root / f)
    t0 = time.perf_counter()
    said = run(["dvc", "repro"], root, env).stdout
    print(f"dvc repro: {time.perf_counter() - t0:.0f} s")  # a figure, never asserted
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"corpus"} | {f"{s}@{m}" for s in ("lm", "activations", "saes",
                         "steering", "decompose", "geometry") for m in models} | {
                         f"align@{PAIR}", f"transfer@{PAIR}", "report"}, sorted(lock)  # fmt: skip

    # pretrained SAEs, from the registry and from the folder, evaluated and written
    for model, hook, name in [("gpt2", "blocks.1.hook_resid_pre", "res"),
                              ("gpt2", "blocks.1.hook_resid_pre", "local"),
                              ("gpt2", "blocks.0.hook_resid_pre", "res-jb-6"),
                              ("pythia-70m-deduped", "blocks.1.hook_resid_post", "res")]:  # fmt: skip
        folder = root / "data/saes" / model / hook / name
        cfg = json.loads((folder / "cfg.json").read_text())
        assert cfg["d_sae"] == 96 and cfg["metadata"]["hook_name"] == hook
        source = cfg["metadata"]["feature_atlas"]["pretrained"]
        assert ("path" in source) == (name == "local")
        m = json.loads((folder / "metrics.json").read_text())
        assert 0 < m["l0"] < 96 and math.isfinite(m["fvu"])

    # the CAA and ActAdd sets steered both models, with SAE decompositions
    for model in models:
        metrics = json.loads((root / f"metrics/steering/{model}.json").read_text())
        assert set(metrics) == {"caa_ab", "sentiment_actadd"}, metrics
        for concept, m in metrics.items():
            assert math.isfinite(m["steerability"]), (model, concept, m)
            ev = json.loads((root / f"data/steering/{model}/{concept}/evaluation.json").read_text())
            print(model, concept, {k: m[k] for k in m if not isinstance(m[k], dict)})
            dec = json.loads(
                (root / f"data/decomposition/{model}/{concept}/decomposition.json").read_text()
            )
            assert dec["sae"] in ("res", "res-jb-6", "res-sm-2"), dec.get("sae")
            assert ev

    # aligned across tokenizers through the pretrained `res` SAEs
    al = root / "data/alignment/gpt2__pythia-70m-deduped"
    assert al.is_dir() and any(al.iterdir())

    # steering at gpt2's `res` hook carried along the matches into pythia's `res` hook
    # (different hook names: the alignment's hook pair), tested against random directions
    ha, hb = params["align"]["config"]["hook_pairs"][0]
    tr = json.loads((root / f"data/transfer/{PAIR}/transfer.json").read_text())
    head = json.loads((root / f"metrics/transfer/{PAIR}.json").read_text())
    n_random = params["align"].get("transfer", {}).get("n_random", 32)
    assert set(tr["concepts"]) == {"caa_ab", "sentiment_actadd"}, tr
    for concept, rows in tr["concepts"].items():
        r = rows[f"{ha}~{hb}"]
        assert (r["hook_a"], r["hook_b"], r["sae_a"], r["sae_b"]) == (ha, hb, "res", "res")
        assert r["norm_carried"] > 0 and math.isfinite(r["cosine_transferred_own"])  # not empty
        assert r["random"]["n"] == len(r["random"]["slopes"]) == n_random
        assert all(map(math.isfinite, r["random"]["slopes"])) and r["random"]["sd"] > 0
        assert r["p_floor"] == pytest.approx(1 / (n_random + 1))
        assert r["p_floor"] <= r["p_vs_random"] <= 1
        for kind in ("own", "transferred", "random"):
            v = head[f"transfer/{concept}/{ha}~{hb}/{kind}"]
            assert math.isfinite(v) and v == pytest.approx(r[kind]["steerability"], abs=1e-6)
        assert math.isfinite(head[f"transfer/{concept}/{ha}~{hb}/z_vs_random"])
        lo, hi = r["own"]["ci95"]
        assert lo <= r["own"]["steerability"] <= hi

    # geometry measures the planted world's concepts: on an HF corpus it says, in one line,
    # that it skipped, and the report's geometry section says so too
    for model in models:
        lines = [ln for ln in said.splitlines() if ln.startswith(f"geometry@{model}:")]
        assert len(lines) == 1 and lines[0].startswith(f"geometry@{model}: skipped: "), lines
        assert "no concept labels" in lines[0]
        geo = json.loads((root / f"data/geometry/{model}/geometry.json").read_text())
        assert set(geo) == {"skipped"}
    index = (root / "reports/index.html").read_text()
    assert "geometry@gpt2 skipped: " in index and "not run: concepts, geometry" in said

    # dashboards of every published SAE (the registry's and the folder's), named by source
    for model, entries in params["saes"]["pretrained"].items():
        for name, e in entries.items():
            d = root / "reports/dashboards" / model / e["hook"] / name
            source = f"{e['release']}/{e['sae_id']}" if "release" in e else f"folder {e['path']}"
            assert source in (d / "index.html").read_text(), (model, name)
            data = json.loads((d / "dashboard_data.json").read_text())
            assert data["pretrained"] == source and data["d_sae"] == 96
            pages = sorted(d.glob("feature-*.html"))
            assert pages and all(0 <= int(p.stem.split("-")[1]) < 96 for p in pages)

    # downstream effects of each vector, read through the pretrained SAEs, with the
    # random-direction null and its held-out controls
    for model in models:
        dm = json.loads((root / f"metrics/decomposition/{model}.json").read_text())
        for concept in ("caa_ab", "sentiment_actadd"):
            dec = json.loads(
                (root / f"data/decomposition/{model}/{concept}/decomposition.json").read_text()
            )
            h = dec["hook"]
            down = dec["downstream"][h]
            assert down["table"] and all(math.isfinite(t["mean_change"]) for t in down["table"])
            null = dec["downstream_null"]
            assert null["n_random"] == 32 and null["hooks"], null
            for hook, r in null["hooks"].items():
                assert r["n_tested"] > 0 and len(r["control_n_significant"]) == null["n_control"]
                key = f"downstream_null.{hook}"
                assert dm[concept][f"{key}.n_significant"] == r["n_significant"]
                assert f"{key}.control_n_significant_max" in dm[concept]

    # `atlas features` on the published SAE: top features per token of a new text
    atlas = str(Path(sys.executable).parent / "atlas")
    feats = run([atlas, "features", "I love this film", "--model", "gpt2", "--hook",
                 "blocks.1.hook_resid_pre", "--sae", "res", "--k", "3"], root, env).stdout  # fmt: skip
    print(feats)
    lines = feats.splitlines()
    header = ("gpt2 · blocks.1.hook_resid_pre · res (published: gpt2-small-res-jb/"
              "blocks.1.hook_resid_pre): top 3 active features per token")  # fmt: skip
    assert header in lines, feats  # (after TransformerLens' "Loaded pretrained model" line)
    # the table's fixed columns (stages.report.format_token_features): pos, token, feature, act
    table = lines[lines.index(next(ln for ln in lines if ln.startswith(" pos"))) + 1 :]
    by_pos: dict[int, list[tuple[int, float]]] = {}
    for ln in table:
        pos = int(ln[:4]) if ln[:4].strip() else max(by_pos)
        by_pos.setdefault(pos, []).append((int(ln[20:29]), float(ln[29:38])))
    assert len(by_pos) >= 4, feats  # every token of the text, BOS excluded
    for pos, fs in by_pos.items():
        acts = [a for _, a in fs]
        assert len(fs) == 3 and all(0 <= f < 96 for f, _ in fs), (pos, fs)
        assert acts == sorted(acts, reverse=True) and acts[0] > 0, (pos, fs)
    bad = run([atlas, "features", "I love this film", "--model", "gpt2", "--hook",
               "blocks.8.hook_resid_pre"], root, env, check=False)  # fmt: skip
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
