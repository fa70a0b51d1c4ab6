"""A tiny pipeline output tree (corpus → two toy models → caches → SAEs) built with the
real writers, shared by the report tests. ~3 s to build."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

HOOK = "blocks.0.hook_resid_post"
MODELS = ("tiny-a", "tiny-b")
SAES = (
    {"architecture": "topk", "d_sae": 64, "k": 4},
    {"architecture": "topk", "d_sae": 64, "k": 8},
    {"architecture": "relu", "d_sae": 64},
)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one torch thread (tests/conftest.py)."""


def _build(root: Path) -> Path:
    from stages.activations import ActivationStore, CacheInputs, cache_activations
    from stages.config import CorpusParams, StoreParams, ToyModel
    from stages.corpus import build_toy_corpus
    from stages.models import build_toy_model, save_toy_model, train_tokenizer, windows_for
    from stages.sae import SliceSource, build_sae, evaluate_sae, save_sae
    from stages.sae.concepts import ConceptContext

    torch.set_num_threads(1)
    data = root / "data"
    corpus = build_toy_corpus(CorpusParams.model_validate(
        {"heldout_fraction": 0.3, "toy": {"n_docs": 60, "seed": 0}}))  # fmt: skip
    tok_dir = root / "tok"
    tok_dir.mkdir()
    tok = train_tokenizer(corpus.texts, 1000, tok_dir)
    cols = list(zip(*corpus.labels, strict=True))
    labels = pa.table({"doc_id": pa.array(cols[0], pa.int64()), "char_start": cols[1],
                       "char_end": cols[2], "concept": cols[3]})  # fmt: skip
    names = [c.name for c in corpus.concepts]
    split = np.array(corpus.splits)
    texts = np.array(corpus.texts, dtype=object)
    ids = np.array(corpus.doc_ids)

    def windows(which: str):
        m = split == which
        return windows_for(tok, list(texts[m]), list(ids[m]), 32)

    inputs = CacheInputs(windows("train"), windows("heldout"), labels, names, "tiny-corpus")
    untrained = []  # the untrained-model controls' models, rebuilt as the align flow does
    for seed, name in enumerate(MODELS):
        m = ToyModel.model_validate({
            "source": "toy", "seed": seed, "tokenizer": {"vocab_size": 1000}, "train": {"seq_len": 32},
            "arch": {"n_layers": 1, "d_model": 16, "n_heads": 2, "d_mlp": 32, "n_ctx": 32}})  # fmt: skip
        model = build_toy_model(m, tok).eval()
        untrained.append(build_toy_model(m, tok).eval())
        mdir = data / "models" / name
        mdir.mkdir(parents=True)
        save_toy_model(model, m, tok_dir, mdir)
        sdir = data / "activations" / name
        cache_activations(model, name, [HOOK], inputs,
                          StoreParams(seq_len=32, batch_size=16, shard_rows=1024, chunk_rows=256),
                          sdir)  # fmt: skip
        store = ActivationStore(sdir)
        heldout = store.source(HOOK, "heldout")
        lab = store.read("concept_labels", "heldout")
        hierarchy: dict[str, list[str]] = {}
        for c in corpus.concepts:
            if c.parent:
                hierarchy.setdefault(c.parent, []).append(c.name)
        context = ConceptContext(store.read("doc_ids", "heldout"), store.read("token_ids", "heldout"),
                                 hierarchy, {c.name: c.kind for c in corpus.concepts})  # fmt: skip
        for i, raw in enumerate(SAES):
            sae = build_sae({**raw, "d_in": 16, "n_training_tokens": 4096, "batch_size": 64,
                             "seed": seed * 10 + i}).eval()  # fmt: skip
            with torch.no_grad():  # a little structure: encoder = decoder transpose, biases
                sae.b_enc.fill_(-0.2 if raw["architecture"] == "relu" else 0.0)
            ev = evaluate_sae(sae, SliceSource(heldout, 0, heldout.n_rows), model=model,
                              hook_name=HOOK, tokens=store.windows("heldout", 4), labels=lab,
                              concept_names=names, context=context, random_draws=4)  # fmt: skip
            save_sae(data / "saes" / name / HOOK / sae.cfg.display_name, sae, hook_name=HOOK,
                     model_name=name, log_feature_density=ev.log10_feature_density,
                     metrics=ev.metrics)  # fmt: skip
    aligned = _align(data, tuple(untrained))
    _steer(data)
    _transfer(data, aligned.pairs[0])
    _geometry(data, corpus)
    return data


def _geometry(data: Path, corpus) -> None:
    """The geometry stage's files for both models (`model_geometry` + `write_geometry`),
    small nulls. The corpus goes beside `data/`, not in `data/corpus/` (that would turn
    the world section on)."""
    from stages.activations import ActivationStore
    from stages.config import CorpusParams
    from stages.corpus import write_corpus
    from stages.geometry.run import GeometryConfig, model_geometry, write_geometry

    concepts = data.parent / "concepts"  # the whole corpus (simplex steering reads its text)
    params = CorpusParams.model_validate(
        {"heldout_fraction": 0.3, "toy": {"n_docs": 60, "seed": 0}}
    )
    write_corpus(corpus, concepts, params)
    cfg = GeometryConfig(n_null=20, n_null_clusters=3, sae_names=("topk-64-k4",),
                         min_token_count=2)  # fmt: skip
    for name in MODELS:
        result = model_geometry(ActivationStore(data / "activations" / name),
                                data / "models" / name, concepts, data / "saes" / name, cfg)  # fmt: skip
        write_geometry(result, data / "geometry" / name)


def _steer(data: Path) -> None:
    """The steering stage's files for one concept of tiny-a (`run_concept` +
    `write_concept`), and the decompose stage's (`decompose_concept` into tiny-a's
    smallest TopK SAE)."""
    from stages.activations import ActivationStore
    from stages.models import load_model
    from stages.sae import load_sae
    from stages.steering import ConceptConfig, load_probes, run_concept, toy_sets, write_concept
    from stages.steering.decompose_run import decompose_concept, write_decomposition

    model = load_model(data / "models" / "tiny-a")
    s = toy_sets(seed=0, n_train=8, n_heldout=4, names=["emotion_polarity"])["emotion_polarity"]
    saes = {HOOK: load_sae(data / "saes" / "tiny-a" / HOOK / "topk-64-k4")}
    cfg = ConceptConfig(multipliers=(-2.0, 0.0, 2.0), n_windows=4, max_features=6,
                        n_candidates=32, n_generations=1, max_new_tokens=3, gt_rows=2000,
                        probe_rows=2000, batch_size=16)  # fmt: skip
    store = ActivationStore(data / "activations" / "tiny-a")
    result = run_concept(model, s, ["blocks.0.hook_mlp_out", HOOK], store, cfg,
                         model_name="tiny-a")  # fmt: skip
    folder = write_concept(result, data / "steering" / "tiny-a")
    dd = decompose_concept(model, s, result.vectors, result.evaluation_dict(), saes, store, cfg,
                           probes=load_probes(folder))  # fmt: skip
    write_decomposition(dd, data / "decomposition" / "tiny-a", s.name, "tiny-a")


def _transfer(data: Path, pair) -> None:
    """The transfer stage's transfer.json: tiny-a's emotion_polarity vector carried into tiny-b
    through the Hungarian matches and tested against tiny-b's own mean-difference vector."""
    from stages.alignment import evaluate_transfer, transfer_vector
    from stages.alignment.transfer import correct_transfer
    from stages.io import write_json
    from stages.models import load_model
    from stages.sae import load_sae
    from stages.steering import compute_vectors, load_vector, toy_sets

    s = toy_sets(seed=0, n_train=8, n_heldout=4, names=["emotion_polarity"])["emotion_polarity"]
    model_b = load_model(data / "models" / "tiny-b")
    own = compute_vectors(model_b, s.train_pairs, [HOOK])[HOOK]
    carried_from, _ = load_vector(data / "steering" / "tiny-a" / "emotion_polarity")
    out = data / "transfer" / "tiny-a__tiny-b"
    sae_a, sae_b = (load_sae(data / "saes" / m / HOOK / n)
                    for m, n in (("tiny-a", pair.name_a), ("tiny-b", pair.name_b)))  # fmt: skip
    vt = transfer_vector(carried_from[HOOK], sae_a, sae_b, pair.hungarian)
    test = evaluate_transfer(model_b, s, HOOK, own, vt, (-2.0, 0.0, 2.0), n_random=19)
    row = {"sae_a": pair.name_a, "sae_b": pair.name_b, **test.to_dict()}
    transfer = {"method": "nnls", "k": None, "n_random": 19,
                "concepts": {"emotion_polarity": {HOOK: row}}}  # fmt: skip
    write_json(out / "transfer.json", correct_transfer(transfer))  # Holm, as the stage does


def _align(data: Path, untrained: tuple | None = None):
    """The align stage's files for tiny-a vs tiny-b, with the real writer."""
    from stages.activations import ActivationStore
    from stages.alignment.outputs import write_alignment
    from stages.alignment.stream import AlignConfig, align_pair
    from stages.sae.io import load_model_saes

    saes_a, best_a = load_model_saes(data / "saes" / "tiny-a")
    saes_b, best_b = load_model_saes(data / "saes" / "tiny-b")
    cfg = AlignConfig(max_tokens=4000, top_up=True, chunk_rows=512, n_permutations=5, n_samples=256, top_k=8,
                      self_check_tokens=1024, sae_names=("topk-64-k4",))  # fmt: skip
    result = align_pair(ActivationStore(data / "activations" / "tiny-a"),
                        ActivationStore(data / "activations" / "tiny-b"), saes_a, saes_b, cfg,
                        best_latents_a=best_a, best_latents_b=best_b, progress=False,
                        untrained=untrained)  # fmt: skip
    write_alignment(result, data / "alignment" / "tiny-a__tiny-b")
    return result


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """`<tmp>/data` with corpus-derived caches, models and SAEs for tiny-a and tiny-b."""
    return _build(tmp_path_factory.mktemp("report-world"))


@pytest.fixture(scope="session")
def tiny_report(tiny_data, tmp_path_factory):
    """The report built once from `tiny_data`, with one cross-model partner pair."""
    from stages.report import build_report

    out = tmp_path_factory.mktemp("report-out") / "reports"
    key_a = f"tiny-a/{HOOK}/{_topk4_name(tiny_data, 'tiny-a')}"
    key_b = f"tiny-b/{HOOK}/{_topk4_name(tiny_data, 'tiny-b')}"
    report = build_report(
        out,
        data=tiny_data,
        provenance={
            "run_id": "run-abc123",
            "git_commit": "deadbeef",
            "params_hash": "p-42",
            "inputs": {str(tiny_data / "saes" / "tiny-a"): "hash-saes-a"},
        },  # fmt: skip
        dashboards={"n_most_active": 4, "n_contexts": 5, "max_rows": None},
        extra_features={key_a: {7: "steering component (test)"}},
        partners=[(key_a, 3, key_b, 5, 0.77)],
    )
    return report, key_a, key_b


def _topk4_name(data: Path, model: str) -> str:
    names = sorted(p.name for p in (data / "saes" / model / HOOK).iterdir())
    return next(n for n in names if n.startswith("topk") and n.endswith("k4"))
