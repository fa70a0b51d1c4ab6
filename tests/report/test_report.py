"""The report built from a tiny pipeline tree: provenance on every figure, dashboards,
partner links, sections that did not run, features of a text, the CLI."""

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from stages.report.alignment import fmt_p
from stages.report.html import fmt
from tests.report.conftest import HOOK


class _Figures(HTMLParser):
    """Collect each <figure>'s <img> src and its caption text."""

    def __init__(self):
        super().__init__()
        self.figs, self._in = [], False

    def handle_starttag(self, tag, attrs):
        if tag == "figure":
            self.figs.append({"src": None, "caption": ""})
            self._in = True
        elif tag == "img" and self._in:
            self.figs[-1]["src"] = dict(attrs)["src"]

    def handle_endtag(self, tag):
        if tag == "figure":
            self._in = False

    def handle_data(self, data):
        if self._in:
            self.figs[-1]["caption"] += data


def test_every_figure_carries_provenance(tiny_report, tiny_data):
    report, _, _ = tiny_report
    # Pareto + density per model; steering: curves, layer sweep, ablation, decomposition,
    # downstream, downstream against random directions, clamp, targeted; alignment: a null
    # histogram per SAE pair + 2 heatmaps + the steering-vector transfer; geometry: cosine
    # heatmap, simplex, circles; ground truth: SAE quality against probing per model (the
    # hooks with >= 3 SAEs)
    assert report.index.exists() and len(report.figures) == 4 + 8 + 1 + 2 + 1 + 3 + 2
    quality = [f.name for f in report.figures if f.name.startswith("figures/ground_truth/")]
    assert quality == [
        f"figures/ground_truth/{m}__{HOOK}__quality.png" for m in ("tiny-a", "tiny-b")
    ]
    p = _Figures()
    p.feed(report.index.read_text())
    imgs = [f for f in p.figs if f["src"]]
    assert [f["src"] for f in imgs] == [f.name for f in report.figures]
    for fig, rec in zip(imgs, report.figures, strict=True):
        assert rec.path.exists() and rec.path.read_bytes()[:4] == b"\x89PNG"
        for text in (fig["caption"], rec.caption):
            assert "run-abc123" in text and "deadbeef" in text and "p-42" in text
            for path, h in rec.inputs.items():
                assert path in text and h in text
    a_figs = [r for r in report.figures if r.name.startswith("figures/sweep/tiny-a")]
    # the caller's hash is used as given; a hash it did not give is computed
    assert all(r.inputs[str(tiny_data / "saes" / "tiny-a")] == "hash-saes-a" for r in a_figs)
    b_figs = [r for r in report.figures if r.name.startswith("figures/sweep/tiny-b")]
    assert all(r.inputs[str(tiny_data / "saes" / "tiny-b")].endswith(".dir") for r in b_figs)


def test_every_section_ran_and_nothing_is_external(tiny_report):
    report, _, _ = tiny_report
    assert report.sections == {"sweep": True, "concepts": True, "ground-truth": True,
                               "steering": True, "alignment": True, "geometry": True,
                               "dashboards": True}  # fmt: skip
    html = report.index.read_text()
    assert "<b>Not run.</b>" not in html
    assert "<script" not in html and "http://" not in html and "https://" not in html


def test_sections_without_inputs_say_not_run(tiny_data, tmp_path):
    from stages.report import ReportPaths, build_report

    paths = ReportPaths.under(tiny_data)
    paths = ReportPaths(paths.saes, paths.activations, paths.models, tmp_path / "no-steering",
                        tmp_path / "no-decomposition", tmp_path / "no-alignment",
                        tmp_path / "no-transfer")  # fmt: skip
    report = build_report(tmp_path / "reports", data=paths, models=["tiny-b"],
                          dashboards={"n_most_active": 2, "concept_features": False})  # fmt: skip
    assert report.sections["steering"] is False and report.sections["alignment"] is False
    html = report.index.read_text()
    assert html.count("<b>Not run.</b>") == 2 and str(tmp_path / "no-alignment") in html
    assert list(report.dashboards) == [f"tiny-b/{HOOK}/topk-64-k4"]


def test_ground_truth_section(tiny_report, tiny_data):
    """k-sparse probing with its controls, absorption and Gurnee's null, from each SAE's
    metrics.json, with the numbers that are there."""
    import json

    report, _, _ = tiny_report
    html = report.index.read_text()
    for head in ("k-sparse probing", "Feature absorption", "Gurnee's null", "dense probe",
                 "lexical lookup", "SAE / random [95 % CI]"):  # fmt: skip
        assert head in html, head
    m = json.loads(
        (tiny_data / "saes" / "tiny-a" / HOOK / "topk-64-k4" / "metrics.json").read_text()
    )
    sp = m["ground_truth"]["sparse_probing"]
    k1 = sp["summary"]["k1_f1"]
    assert 0 <= k1["lo"] <= k1["mean"] <= k1["hi"] <= 1
    assert f"{k1['mean']:.2f} <span class='muted'>[{k1['lo']:.2f}, {k1['hi']:.2f}]" in html
    d = m["downstream"]
    assert d["random_draws"] == 4 and d["kl_random_sd_draws"] > 0
    assert f"{d['sae_to_random_kl_ratio']:.3f}" in html


def test_geometry_section(tiny_report, tiny_data):
    """Concept geometry: its tables (with the nulls' floors and Holm) and three figures,
    drawn from data/geometry/<M>; the rare concepts' skips are named."""
    report, _, _ = tiny_report
    names = [f.name for f in report.figures if f.name.startswith("figures/geometry/")]
    assert names == ["figures/geometry/cosine_heatmap.png", "figures/geometry/simplex.png",
                     "figures/geometry/circles.png"]  # fmt: skip
    html = report.index.read_text()
    body = html[html.index('<section id="geometry">') :]
    body = body[: body.index("</section>")]
    for text in ("Hierarchical orthogonality", "mammal / bird / fish simplex", "Circles",
                 "Clusters of SAE decoder directions", "Do the two models share",
                 "floor 0.048", "Holm", "Concepts without a vector"):  # fmt: skip
        assert text in body, text
    g = json.loads((tiny_data / "geometry" / "tiny-a" / "geometry.json").read_text())
    assert set(g["spaces"]) == {"unembed", HOOK}
    assert "dog" in g["skipped"] and "expected >= 3" in g["skipped"]["dog"]


def test_steering_section_and_components(tiny_report, tiny_data):
    report, key_a, _ = tiny_report
    names = [f.name for f in report.figures if f.name.startswith("figures/steering/")]
    assert [n.rsplit("__", 1)[-1] for n in names] == [
        "steerability.png", "layer_sweep.png", "ablation.png", "decomposition.png",
        "downstream.png", "downstream_null.png", "clamp.png", "targeted.png"]  # fmt: skip
    dec = json.loads((tiny_data / "decomposition" / "tiny-a" / "emotion_polarity" /
                      "decomposition.json").read_text())  # fmt: skip
    nd = dec["nn_decomposition"]
    top = max(zip(nd["coefficients"], nd["features"], strict=True))[1]
    data = json.loads(report.dashboard_data[key_a].read_text())
    why = data["selected"][str(top)]
    assert any(r.startswith("steering component #1 of emotion_polarity") for r in why)
    html = report.index.read_text()
    assert f'topk-64-k4/feature-{top}.html">#{top}</a>' in html  # the summary links it
    # the controls table: every vector at equal norm and equal KL against the random null
    assert "z (p) vs random" in html and "effect (equal KL)" in html
    ctl = dec["controls"]
    raw = ctl["vectors"]["raw"]["equal_norm"]
    assert f"{raw['z']:.2f} ({raw['p']:.3f})" in html
    assert f"floor {ctl['p_floor']:.4f}" in html
    # the feature circuit: its first node and the ablation control, as the JSON has them
    circ = dec["circuit"]
    first = next(iter(circ["nodes"].values()))[0]
    assert "Sparse feature circuits" in html and f"{first['latent']} (" in html
    assert f"(z {circ['ablation']['z']:.2f})" in html
    # interventions: ablation per hook and the clamp, with their z (p) as the JSON has them
    ev = json.loads((tiny_data / "steering" / "tiny-a" / "emotion_polarity" /
                     "evaluation.json").read_text())  # fmt: skip
    ab = next(iter(ev["directional_ablation"].values()))["ablate"]
    assert "<b>Ablate+add</b>" in html and f"{ab['z']:.2f} ({ab['p']:.3f})" in html
    cl = dec["clamp"]
    assert f"clamp {fmt(cl['effect'])} [" in html and "clamp − add" in html


def test_dashboards_and_partner_links(tiny_report):
    report, key_a, key_b = tiny_report
    assert set(report.dashboards) == {key_a, key_b}  # default: the TopK with the smallest k
    data = json.loads(report.dashboard_data[key_a].read_text())
    assert data["model"] == "tiny-a" and data["hook"] == HOOK
    sel = data["selected"]
    assert "steering component (test)" in sel["7"]
    assert any(r.startswith("aligned with tiny-b") for r in sel["3"])
    assert sum(any(r.startswith("most active") for r in v) for v in sel.values()) == 4
    assert any(any(r.startswith("concept ") for r in v) for v in sel.values())
    rec = data["records"]["3"]
    assert rec["top_contexts"] and len(rec["top_contexts"]) <= 5
    acts = [c["act"] for c in rec["top_contexts"]]
    assert acts == sorted(acts, reverse=True) and acts[0] == pytest.approx(rec["max_act"])
    for c in rec["top_contexts"]:  # the highlighted token carries the context's activation
        assert c["acts"][c["at"]] == pytest.approx(c["act"], abs=1e-4)
    assert sum(rec["histogram"]["counts"]) == round(rec["density"] * data["n_rows"])
    assert len(rec["logit_pos"]) == 10 and rec["logit_pos"][0][1] >= rec["logit_pos"][-1][1]
    # every live latent has a short description
    assert len(data["features"]) >= 10 and all("top_tokens" in d for d in data["features"].values())
    # partner pages link to each other
    page_a = report.feature_pages[key_a][3].read_text()
    page_b = report.feature_pages[key_b][5].read_text()
    assert 'href="../../../tiny-b/blocks.0.hook_resid_post/topk-64-k4/feature-5.html"' in page_a
    assert 'href="../../../tiny-a/blocks.0.hook_resid_post/topk-64-k4/feature-3.html"' in page_b
    for page in (page_a, page_b):
        assert "run-abc123" in page and "deadbeef" in page


def test_alignment_section_and_partner_pages(tiny_report, tiny_data):
    report, key_a, key_b = tiny_report
    names = [f.name for f in report.figures if f.name.startswith("figures/alignment/")]
    assert sorted(n.rsplit("__", 1)[-1] for n in names) == [
        "linear_cka_layers.png", "mutual_knn_layers.png", "null.png", "transfer.png"]  # fmt: skip
    html = report.index.read_text()
    assert "Concept ground truth across models" in html
    meta = json.loads((tiny_data / "alignment" / "tiny-a__tiny-b" / "meta.json").read_text())
    share = 100 * meta["n_heldout_tokens"] / meta["n_tokens"]
    assert 0 < share < 100 and f", {share:.0f} % from the held-out split)" in html
    # the steering-vector transfer test, with its numbers from transfer.json
    assert "Steering-vector transfer (tiny-a → tiny-b)" in html
    row = json.loads((tiny_data / "transfer" / "tiny-a__tiny-b" / "transfer.json").read_text())
    row = row["concepts"]["emotion_polarity"][HOOK]
    block = html.split("Steering-vector transfer (tiny-a → tiny-b)", 1)[1]
    cells = re.search(r"<td[^>]*>emotion_polarity</td>(.*?)</tr>", block, re.S).group(1)
    assert fmt(row["transferred"]["steerability"]) in cells and fmt(row["p_vs_random"]) in cells
    # one test in the fixture's family: Holm leaves p as it is; the verdict reads Holm's p
    assert row["p_vs_random_holm"] == row["p_vs_random"] and row["p_floor"] == pytest.approx(1 / 20)
    assert ("beats random" in cells) == (row["p_vs_random_holm"] <= 0.05)
    assert "Holm (1979)" in block.split("</table>", 1)[0]
    # the similarity tests: every p with its floor, normal tail and Holm p, family named
    scores = json.loads((tiny_data / "alignment" / "tiny-a__tiny-b" / "scores.json").read_text())
    tests = html.split("Similarity tests (tiny-a vs tiny-b)", 1)[1].split("</table>", 1)[0]
    assert "Holm (1979)" in tests and "normal approximation of the permutation null" in tests
    # sequential tests (the default family_alpha): the family's floor, and per test the
    # draws made / its cap with its own floor
    assert "Besag &amp; Clifford" in tests
    assert f"the family's floor here: {fmt_p(scores['holm_floor'])}" in tests
    assert f"({int(scores['holm_family_size'])} tests)" in tests
    cells = re.search(r"<td[^>]*>Linear CKA</td>(.*?)</tr>", tests, re.S).group(1)
    assert fmt_p(scores[f"linear_cka_p_holm/{HOOK}"]) in cells
    sim = json.loads((tiny_data / "alignment" / "tiny-a__tiny-b" / "similarity.json").read_text())
    t = sim["hook_pairs"][HOOK]["linear_cka"]
    assert t["stop_after"] == 10 and t["n_permutations"] <= t["max_permutations"]
    assert f"{t['n_permutations']} / {t['max_permutations']} ({fmt_p(t['p_floor'])})" in cells
    # the untrained-model controls beside the trained pair; the fixture's models are
    # untrained, so the untrained pair is the trained pair, up to the store's float16
    ctl = html.split("Untrained-model controls (tiny-a vs tiny-b)", 1)[1].split("</table>", 1)[0]
    assert "Partner fraction" in ctl and "--untrained" in ctl
    cells = re.search(r"<td[^>]*>Linear CKA</td>(.*?)</tr>", ctl, re.S).group(1)
    assert fmt(scores[f"linear_cka_untrained/{HOOK}"]) in cells
    assert fmt(scores[f"linear_cka_trained_vs_untrained/{HOOK}"]) in cells
    assert scores[f"linear_cka_untrained/{HOOK}"] == pytest.approx(
        scores[f"linear_cka_subsample/{HOOK}"], abs=1e-4)  # fmt: skip
    # top-token Jaccard over token ids, beside its all-pairs chance level
    assert "Jaccard, all pairs (chance)" in html and "Top-token Jaccard over vocabulary ids" in html
    assert len(row["random"]["slopes"]) == 19
    # every dashboarded latent links to its Hungarian partner's page (one hop)
    import pyarrow.parquet as pq

    t = pq.read_table(tiny_data / "alignment" / "tiny-a__tiny-b" / "matches" /
                      f"{HOOK}__{key_a.rsplit('/', 1)[1]}.parquet").to_pydict()  # fmt: skip
    partner = {a: b for a, b, m in zip(t["latent_a"], t["latent_b"], t["method"], strict=True)
               if m == "hungarian"}  # fmt: skip
    for f, page in report.feature_pages[key_a].items():
        assert partner[f] in report.feature_pages[key_b]
        assert f"feature-{partner[f]}.html" in page.read_text()


def test_log_to_sends_every_figure():
    from stages.report import Report, ReportFigure

    class FakeRun:
        def __init__(self):
            self.logged = []

        def artifact(self, path, subdir=None):
            self.logged.append((Path(path).name, subdir))

    figs = [ReportFigure("figures/sweep/a.png", Path("/r/figures/sweep/a.png"), "t", "c", {})]
    run = FakeRun()
    Report(Path("/r/index.html"), figs, {}, {}, {}, {}).log_to(run)
    assert run.logged == [("a.png", "figures/sweep")]


def test_features_of_text_matches_a_direct_encode(tiny_report, tiny_data):
    from stages.models import load_model
    from stages.report import features_of_text, format_token_features, load_dashboard_data
    from stages.sae import load_sae

    report, key_a, _ = tiny_report
    model = load_model(tiny_data / "models" / "tiny-a")
    sae = load_sae(tiny_data / "saes" / key_a)
    dash = load_dashboard_data(report.dashboard_data[key_a].parent)
    text = "Mia feels calm. The dog runs."
    rows = features_of_text(text, model, HOOK, sae, dash, k=3)
    _, cache = model.run_with_cache(text, names_filter=[HOOK])
    with torch.no_grad():
        f = sae.encode(cache[HOOK][0])
    assert [r.token for r in rows] == model.to_str_tokens(text)[1:]  # BOS left out
    for r in rows:
        vals, ids = torch.topk(f[r.position], 3)
        want = [(int(i), float(v)) for v, i in zip(vals, ids, strict=True) if v > 0]
        assert [(a.feature, pytest.approx(a.activation, abs=1e-5)) for a in r.features] == want
        for a in r.features:
            d = dash["features"].get(str(a.feature))
            assert d is None or d["top_tokens"][0] in a.description
    table = format_token_features(rows)
    assert table.splitlines()[0].split()[:4] == ["pos", "token", "feature", "act"]
    with pytest.raises(ValueError, match="not a hook"):
        features_of_text(text, model, "blocks.9.hook_resid_post", sae, dash)


def test_features_cli(tiny_report, tiny_data, capsys):
    from flows.features import main

    report, key_a, _ = tiny_report
    reports = report.index.parent
    args = ["--hook", HOOK, "--data", str(tiny_data), "--reports", str(reports), "--k", "2"]
    assert main(["The cat", "--model", "tiny-a", *args]) == 0
    out = capsys.readouterr().out
    assert key_a.split("/")[-1] in out and re.search(r"^\s+1\s+'T", out, re.M)
    assert main(["x", "--model", "nope", *args]) == 2
    assert f"{tiny_data / 'models' / 'nope'}: missing" in capsys.readouterr().err
    assert main(["x", "--model", "tiny-a", *args, "--sae", "zz"]) == 2
    assert "no SAE there" in capsys.readouterr().err


def test_provenance_from_a_run_reuses_its_input_hashes(monkeypatch, tmp_path):
    import stages.tracking
    from stages.report import Provenance

    logged = {"run_id": "r9", "git_commit": "abc-dirty",
              "inputs": {"saes": {"hash": "h1.dir", "path": "data/saes/toy-a"}}}  # fmt: skip
    monkeypatch.setattr(stages.tracking, "provenance", lambda run_id: logged)
    p = Provenance.from_run("r9", params_hash="ph")
    assert (p.run_id, p.git_commit, p.params_hash) == ("r9", "abc-dirty", "ph")
    assert p.hash_of("data/saes/toy-a") == "h1.dir"  # not recomputed (the path does not exist)
    assert p.hash_of(tmp_path / "nothing") == "missing"
    (tmp_path / "f.txt").write_text("x")
    assert p.hash_of(tmp_path / "f.txt") == "9dd4e461268c8034f5c8564e155c67a6"  # md5("x")
    line = p.caption_line(["data/saes/toy-a"])
    assert line == "MLflow run r9 · git abc-dirty · params ph · inputs: data/saes/toy-a (h1.dir)"


def test_steering_sae_is_identified_by_decoder_cosines(tiny_data):
    """decomposition.json names the hook, not the SAE; three SAEs of width 64 share it."""
    from stages.report.steering import sae_resolver, steered_concepts
    from stages.report.sweep import discover_saes

    saes = discover_saes(tiny_data / "saes")
    resolve = sae_resolver([(s.model, s.hook, s.name, s.path) for s in saes])
    (c,) = steered_concepts(tiny_data / "steering", tiny_data / "decomposition")
    assert resolve(c) == f"tiny-a/{HOOK}/topk-64-k4"
    others = [(s.model, s.hook, s.name, s.path) for s in saes if s.name != "topk-64-k4"]
    assert sae_resolver(others)(c) is None  # no SAE matches: nothing is guessed


def test_hooks_with_one_sae_share_a_table_and_get_no_pareto_figure(tmp_path):
    """A Pareto figure needs a sweep: a hook with one SAE would show one dot per panel.
    Such hooks share one table and one density figure per model; a hook with several
    SAEs keeps its own frontier."""
    from stages.report.html import ReportContext
    from stages.report.provenance import Provenance
    from stages.report.sweep import SAERef, sweep_section

    def sae(hook: str, name: str, arch: str, l0: float, fvu: float) -> SAERef:
        return SAERef("m", hook, name, tmp_path / "saes/m" / hook / name, arch,
                      {"l0": l0, "fvu": fvu, "downstream": {"ce_loss_recovered": 0.9}})  # fmt: skip

    saes = [sae("blocks.0.hook_resid_post", "topk-64-k4", "topk", 4.0, 0.3),
            sae("blocks.0.hook_resid_post", "relu-64", "relu", 20.0, 0.2),
            sae("blocks.0.hook_mlp_out", "topk-64-k8", "topk", 8.0, 0.4),
            sae("blocks.1.hook_resid_post", "topk-64-k2", "topk", 2.0, 0.5)]  # fmt: skip
    ctx = ReportContext(out=tmp_path / "report", provenance=Provenance())
    section = sweep_section(ctx, saes, tmp_path / "saes")
    assert [f.name for f in ctx.figures] == [
        "figures/sweep/m__blocks.0.hook_resid_post__pareto.png",
        "figures/sweep/m__blocks.0.hook_resid_post__density.png",
        "figures/sweep/m__single__density.png",  # the two one-SAE hooks, one figure
    ]
    assert section.body.count("<table>") == 2
    single = section.body[section.body.index("hooks with one SAE") :]
    assert "<code>blocks.0.hook_mlp_out</code>" in single and "topk-64-k8" in single
    assert "<code>blocks.1.hook_resid_post</code>" in single and "topk-64-k2" in single


def test_world_section_reads_the_probe_tables_from_metrics(tiny_data, tmp_path):
    """build_report hands the world section `ReportPaths.probes` (metrics/activations/
    <M>.json, key "probes"), where the activations stage writes them."""
    import json

    from stages.config import CorpusParams
    from stages.corpus import build_corpus, write_corpus
    from stages.report import ReportPaths, build_report

    p = CorpusParams.model_validate({"heldout_fraction": 0.2, "toy": {"n_docs": 40, "seed": 1}})
    write_corpus(build_corpus(p), tmp_path / "corpus", p)
    probes = tmp_path / "metrics" / "activations"
    probes.mkdir(parents=True)
    row = {"kind": "contextual", "prevalence": 0.01, "lexical_f1": 0.4, "best_f1": 0.95,
           "best_hook": HOOK, "lift": 0.55, "probe_f1": {HOOK: 0.95},
           "null_f1": {HOOK: 0.02}, "untrained_f1": {HOOK: 0.3}, "untrained_best_f1": 0.3}  # fmt: skip
    table = {"n_train_rows": 100, "n_heldout_rows": 100, "hooks": [HOOK], "skipped": [],
             "concepts": {"expect_fish_move": row}}  # fmt: skip
    (probes / "tiny-b.json").write_text(json.dumps({"probes": table}))
    base = ReportPaths.under(tiny_data)
    paths = ReportPaths(base.saes, base.activations, base.models, tmp_path / "no-steering",
                        tmp_path / "no-decomposition", tmp_path / "no-alignment",
                        tmp_path / "no-transfer", tmp_path / "corpus", probes)  # fmt: skip
    report = build_report(tmp_path / "reports", data=paths, models=["tiny-b"],
                          dashboards={"n_most_active": 1, "concept_features": False})  # fmt: skip
    html = report.index.read_text()
    assert "Contextual concepts in tiny-b" in html and "untrained-model F1" in html
    assert "<b>1</b> contextual concepts" in html and "expect_fish_move" in html


def test_geometry_section_says_why_a_model_skipped_geometry(tmp_path):
    """geometry@M on a corpus without concept labels writes {"skipped": why}; the section
    says so (as not run), rather than reading the reason as a list of skipped concepts."""
    from stages.report.geometry import section
    from stages.report.html import ReportContext
    from stages.report.provenance import Provenance

    why = "data/activations/gpt2 has no concept labels"
    (tmp_path / "geometry/gpt2").mkdir(parents=True)
    (tmp_path / "geometry/gpt2/geometry.json").write_text(json.dumps({"skipped": why}))
    ctx = ReportContext(out=tmp_path / "report", provenance=Provenance())
    s = section(ctx, tmp_path / "geometry")
    assert s.body.startswith('<p class="note"><b>Not run.</b>')
    assert f"geometry@gpt2 skipped: {why}" in s.body and not ctx.figures


def _sae_ref(i: int, fvu: float, f1: float):
    from stages.report.sweep import SAERef

    summary = {"k1_f1": {"mean": f1, "lo": f1 - 0.01, "hi": f1 + 0.01},
               "k20_f1": {"mean": f1 + 0.1, "lo": f1 + 0.09, "hi": f1 + 0.11},
               "dense_f1": {"mean": 0.9, "lo": 0.89, "hi": 0.91}}  # fmt: skip
    metrics = {"fvu": fvu, "l0": 8.0 * (i + 1),
               "ground_truth": {"sparse_probing": {"summary": summary}}}  # fmt: skip
    return SAERef("m", HOOK, f"s{i}", Path("/nowhere") / f"s{i}", "topk", metrics)


def test_quality_against_probing_rank_correlation_and_exact_permutation_p():
    """Spearman's ρ between FVU and k-sparse F1 over a hook's SAEs, with the exact
    permutation p: for n = 5 perfectly ranked SAEs, ρ = -1 and only the 2 pairings with
    |ρ| = 1 of the 5! = 120 are as extreme (p = 2/120); a NaN FVU drops its SAE."""
    from stages.report.ground_truth import quality_figure, quality_vs_probing

    group = [_sae_ref(i, fvu=0.01 * (i + 1), f1=0.8 - 0.1 * i) for i in range(5)]
    q = quality_vs_probing(group, "k1")
    assert q["n"] == 5 and q["rho"] == pytest.approx(-1.0)
    assert q["p"] == pytest.approx(2 / 120)
    shuffled = [_sae_ref(i, fvu=f, f1=g) for i, (f, g) in
                enumerate([(0.01, 0.5), (0.02, 0.7), (0.03, 0.4), (0.04, 0.6)])]  # fmt: skip
    q = quality_vs_probing(shuffled, "k20")
    # ranks (1,2,3,4) vs (2,4,1,3): ρ = 1 - 6·(1+4+4+1)/(4·15) = 0
    assert q["rho"] == pytest.approx(0.0) and q["p"] == pytest.approx(1.0)
    # ties, n = 7 (the default hook's SAEs): ρ and the exact p of scipy's own spearmanr,
    # which the batched ranks replace
    import numpy as np
    from scipy import stats

    fvu, f1 = [0.3, 0.1, 0.2, 0.5, 0.4, 0.7, 0.6], [0.4, 0.6, 0.6, 0.3, 0.5, 0.2, 0.45]
    q = quality_vs_probing(
        [_sae_ref(i, fvu=a, f1=b) for i, (a, b) in enumerate(zip(fvu, f1, strict=True))]
    )
    ref = stats.permutation_test((np.array(fvu),),
                                 lambda a: stats.spearmanr(a, f1).statistic,
                                 permutation_type="pairings", n_resamples=np.inf)  # fmt: skip
    assert q["rho"] == pytest.approx(ref.statistic, abs=1e-12) and q["p"] == ref.pvalue
    group[0].metrics["fvu"] = float("nan")
    assert quality_vs_probing(group[:3], "k1")["n"] == 2
    assert math.isnan(quality_vs_probing(group[:3], "k1")["rho"])
    fig = quality_figure(group, "t")
    assert len(fig.axes) == 2


def test_families_section_only_for_a_width_ladder(tiny_report, tiny_data, tmp_path):
    """The default SAEs (one width per config) give no families section; two TopK widths
    of one config do, with the family table's numbers (stages/sae/families.py)."""
    from stages.activations import ActivationStore
    from stages.report.ground_truth import families_section
    from stages.report.html import ReportContext
    from stages.report.provenance import Provenance
    from stages.report.sweep import discover_saes
    from stages.sae import build_sae, save_sae
    from stages.sae.families import family_study

    report, _, _ = tiny_report
    assert "families" not in report.sections
    assert "feature splitting against the planted hierarchy" not in report.index.read_text()
    saes_dir = tmp_path / "saes"
    folder = saes_dir / "tiny-a" / HOOK
    for w in (32, 64):
        sae = build_sae({"architecture": "topk", "d_sae": w, "k": 4, "d_in": 16, "seed": 3,
                         "n_training_tokens": 4096, "batch_size": 64}).eval()  # fmt: skip
        save_sae(folder / f"topk-w{w}-k4-s3", sae, hook_name=HOOK, model_name="tiny-a")
    saes = discover_saes(saes_dir, None)
    ctx = ReportContext(tmp_path / "out", Provenance(run_id="r1", git_commit="c1"))
    sec = families_section(saes, ctx, tiny_data / "activations")
    assert sec is not None and sec.id == "families"
    study = family_study(
        sorted(folder.iterdir()), ActivationStore(tiny_data / "activations" / "tiny-a"), HOOK
    )
    (lad,) = study["ladders"].values()
    assert lad["widths"] == [32, 64]
    assert len(ctx.figures) == 1 and ctx.figures[0].path.exists()
    row = lad["per_width"][0]["concepts"].get("animal")
    if row is not None:
        assert f"{row['f1']:.2f} [{row['lo']:.2f}, {row['hi']:.2f}]" in sec.body


def test_one_pair_gets_the_transfer_summary_but_no_aggregate_over_pairs(tiny_report):
    """With one aligned pair: how many carried vectors transfer (Holm over the pair's
    tests, Wilson interval) and the fraction of the target's own effect; the mean ± sd
    over pairs needs two pairs or more, so that table is absent."""
    report, _, _ = tiny_report
    html = report.index.read_text()
    body = html[html.index('<section id="alignment">') :]
    body = body[: body.index("</section>")]
    assert "Steering transfer over 1 pair<" in body
    assert "95 % interval (Wilson)" in body and "fraction of the target's own effect" in body
    assert "model pairs</h3>" not in body and "p (Holm, all pairs)" not in body
