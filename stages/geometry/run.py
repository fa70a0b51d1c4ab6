"""One model's concept geometry: read the store, the unembedding and the SAEs, run every
test of `stages.geometry.claims` / `clusters` in every space, return what to write.

Spaces: `unembed` (the whitened unembedding, Park et al.'s setting) and each cached hook
(whitened per-token mean residuals, `stages.geometry.vectors`). Concepts whose token set
is smaller than `min_tokens` get no vector; every skip is recorded with its reason under
`skipped` (a tiny model on a tiny corpus sees some species too rarely).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from stages.geometry.claims import (
    circle_fit,
    cosine_matrix,
    hierarchical_orthogonality,
    plane_basis,
    simplex,
)
from stages.geometry.clusters import cluster_purity, latent_concepts
from stages.geometry.vectors import (
    concept_token_sets,
    lda_vectors,
    token_means,
    whitener,
)

# The planted categorical triple, and the cyclic concepts with their items in order
# (stages/corpus.py is the one source of the item lists).
SIMPLEX = ("mammal", "bird", "fish")


def cycles() -> dict[str, list[str]]:
    from stages.corpus import MONTHS, WEEKDAYS

    return {"weekday": WEEKDAYS, "month": MONTHS}


@dataclass(frozen=True)
class GeometryConfig:
    """The stage's knobs (`stages.geometry.config.GeometryParams`)."""

    max_rows: int | None = 262_144
    min_token_count: int = 8
    min_precision: float = 0.9
    min_tokens: int = 3
    n_null: int = 200
    n_null_clusters: int = 10
    sae_names: tuple[str, ...] = ("topk-1024-k16",)
    cluster_rows: int = 32_768
    steer_sentences: int = 32
    steer_random: int = 32
    seed: int = 0


@dataclass
class Concepts:
    """What the corpus says about its concepts: names in store order, parents, kinds."""

    names: list[str]
    parent: dict[str, str | None]
    kind: dict[str, str]

    @classmethod
    def read(cls, corpus: Path, store_names: list[str]) -> Concepts:
        path = Path(corpus) / "concepts.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing; expected the corpus stage's concept list")
        rows = {c["name"]: c for c in json.loads(path.read_text())}
        names = [n for n in store_names if n in rows]
        return cls(names, {n: rows[n]["parent"] for n in names},
                   {n: rows[n].get("kind", "lexical") for n in names})  # fmt: skip


@dataclass
class GeometryResult:
    summary: dict  # -> geometry.json
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # -> vectors.npz
    metrics: dict = field(default_factory=dict)  # -> metrics/geometry/<M>.json
    seconds: dict = field(default_factory=dict)  # wall time per part: MLflow only, never a file


def unembedding(model_dir: Path) -> np.ndarray:
    """γ(y) as rows [d_vocab, d_model]: from a toy model's safetensors, else the loaded
    model's W_U (a pretrained TransformerLens model)."""
    st = Path(model_dir) / "model.safetensors"
    if st.exists():
        from safetensors import safe_open

        with safe_open(str(st), "pt") as f:
            if "unembed.W_U" in f.keys():  # noqa: SIM118 (safe_open has no __contains__)
                return f.get_tensor("unembed.W_U").to(torch.float64).T.numpy()
    from stages.models import load_model

    return load_model(model_dir).W_U.detach().to(torch.float64).T.numpy()


def token_strings(model_dir: Path, ids: np.ndarray) -> dict[int, str]:
    """Decoded strings of `ids` (stripped), with the model's tokenizer."""
    tj = Path(model_dir) / "tokenizer.json"
    if tj.exists():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tj))
        return {int(i): tok.decode([int(i)]).strip() for i in ids}
    from stages.models import load_model

    tok = load_model(model_dir).tokenizer
    return {int(i): tok.decode([int(i)]).strip() for i in ids}


def flat_partition(names: list[str], sets: dict[str, np.ndarray], parent: dict) -> list[str]:
    """Leaf concepts (no child with tokens among `names`) with a token set, dropping any
    whose tokens overlap an earlier one's (singular / plural cut across the species): a
    partition. Species count although they get no vector: a latent's concept comes from
    its activations, which needs no estimator."""
    parents = {parent.get(n) for n in names if len(sets.get(n, ())) > 0}
    out, used = [], set()
    for n in names:
        if n in parents or len(sets.get(n, ())) == 0:
            continue
        s = set(sets[n].tolist())
        if s & used:
            continue
        out.append(n)
        used |= s
    return out


def _training_rows(
    store, hooks: list[str], max_rows: int | None
) -> tuple[dict, np.ndarray, np.ndarray]:
    lo, hi = store.split_range("train")
    n = hi - lo if max_rows is None else min(hi - lo, max_rows)
    ids = store.read("token_ids", "train")[:n].astype(np.int64)
    labels = store.read("concept_labels", "train")[:n]
    x = {h: store.source(h, "train").read(0, n) for h in hooks}
    return x, ids, labels


def space_vectors(
    g: np.ndarray, sets: dict[str, np.ndarray], names: list[str]
) -> dict[str, np.ndarray]:
    return {n: lda_vectors(torch.from_numpy(g[sets[n]])[None])[0].numpy() for n in names}


def analyse_space(
    space: str,
    g: np.ndarray,
    raw: np.ndarray,
    pool: np.ndarray,
    sets: dict[str, np.ndarray],
    concepts: Concepts,
    estimated: list[str],
    strings: dict[int, str],
    cfg: GeometryConfig,
) -> tuple[dict, dict[str, np.ndarray]]:
    """Every test in one space. g: whitened [V, d]; raw: unwhitened [V, d] (circles)."""
    vectors = space_vectors(g, sets, estimated)
    pairs = [(concepts.parent[c], c) for c in estimated
             if concepts.parent.get(c) in vectors and concepts.kind[c] == "lexical"]  # fmt: skip
    out: dict = {"n_pool_tokens": int(len(pool))}
    if pairs:
        out["orthogonality"] = hierarchical_orthogonality(g, sets, vectors, pairs, pool,
                                                          cfg.n_null, cfg.seed)  # fmt: skip
    else:
        out["orthogonality"] = {"skipped": "no (parent, child) pair with both vectors"}
    if all(c in vectors for c in SIMPLEX):
        trio = [sets[c] for c in SIMPLEX]
        tips = np.stack([vectors[c] for c in SIMPLEX])
        res = simplex(g, trio, list(tips), pool, cfg.n_null, cfg.seed + 1)
        basis = plane_basis(tips)
        res["projection"] = {
            "tips": ((tips - tips[0]) @ basis.T).tolist(),
            "tokens": {c: ((g[sets[c]] - tips[0]) @ basis.T).tolist() for c in SIMPLEX},
            "token_strings": {c: [strings.get(int(t), str(t)) for t in sets[c]] for c in SIMPLEX},
        }
        if "animal" in vectors:
            res["projection"]["animal_vector"] = ((vectors["animal"] - tips[0]) @ basis.T).tolist()
        out["simplex"] = res
    else:
        miss = [c for c in SIMPLEX if c not in vectors]
        out["simplex"] = {"skipped": f"no vector for {', '.join(miss)}"}
    circ = {}
    for name, items in cycles().items():
        if name not in sets or len(sets[name]) == 0:
            circ[name] = {"skipped": f"no tokens labelled {name}"}
            continue
        index = {w.lower(): i for i, w in enumerate(items)}
        by_item: dict[int, list[int]] = {}
        for t in sets[name]:
            i = index.get(strings.get(int(t), "").lower())
            if i is not None:
                by_item.setdefault(i, []).append(int(t))
        if len(by_item) < 4:
            circ[name] = {"skipped": f"{len(by_item)} of {len(items)} items have a token "
                          "(need >= 4 for a circle)"}  # fmt: skip
            continue
        order = sorted(by_item)
        item_vecs = np.stack([raw[by_item[i]].mean(0) for i in order])
        res = circle_fit(item_vecs, raw[pool], cfg.n_null, cfg.seed + 2)
        res["items"] = [items[i] for i in order]
        circ[name] = res
    out["circles"] = circ
    order = [n for n in concepts.names if n in vectors]
    arrays = {
        f"{space}/concepts": np.array(order),
        f"{space}/vectors": np.stack([vectors[n] for n in order])
        if order
        else np.zeros((0, g.shape[1])),
    }
    arrays[f"{space}/cosine"] = (
        cosine_matrix(arrays[f"{space}/vectors"]) if order else np.zeros((0, 0))
    )
    return out, arrays


def clusters_at(store, hook: str, sae_dir: Path, flat: list[str], concepts: Concepts,
                cfg: GeometryConfig) -> dict:  # fmt: skip
    """Cluster purity of one SAE's decoder directions (stages.geometry.clusters)."""
    from stages.sae import load_sae

    sae = load_sae(sae_dir).eval()
    lo, hi = store.split_range("heldout")
    n = min(hi - lo, cfg.cluster_rows)
    lab = store.read("concept_labels", "heldout")[:n]
    all_cols = [store.concept_names.index(c) for c in flat]
    y = lab[:, all_cols].astype(np.float32)
    src = store.source(hook, "heldout")
    mass = np.zeros((sae.W_dec.shape[0], len(flat) + 1))
    step = 8192
    with torch.no_grad():
        for a in range(0, n, step):
            b = min(n, a + step)
            f = sae.encode(torch.from_numpy(src.read(a, b).astype(np.float32)))
            on = (f.T @ torch.from_numpy(y[a:b])).double().numpy()  # float32 BLAS
            mass[:, :-1] += on
            mass[:, -1] += f.sum(0).double().numpy() - on.sum(1)
    labels = latent_concepts(mass)
    w = sae.W_dec.detach().to(torch.float64).numpy()
    res = cluster_purity(w, labels, len(flat), cfg.n_null_clusters, cfg.seed + 3)
    res["labelling"] = "activation share >= 0.5 on held-out rows of one concept of the partition"
    res["n_rows"] = int(n)
    return res


def model_geometry(store, model_dir: Path, corpus_dir: Path, sae_root: Path,
                   cfg: GeometryConfig) -> GeometryResult:  # fmt: skip
    """The whole stage for one model (module docstring). Runs torch on one thread: its
    work is thousands of tiny batched solves, which threads only slow down (measured:
    2× slower with 2 threads on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _model_geometry(store, model_dir, corpus_dir, sae_root, cfg)
    finally:
        torch.set_num_threads(threads)


def _model_geometry(store, model_dir: Path, corpus_dir: Path, sae_root: Path,
                    cfg: GeometryConfig) -> GeometryResult:  # fmt: skip
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    if not store.concept_names:
        return GeometryResult({"skipped": f"{store.path} has no concept labels (geometry "
                               "measures the planted world's concepts, which only "
                               "`corpus.source: toy` labels)"})  # fmt: skip
    concepts = Concepts.read(corpus_dir, store.concept_names)
    hooks = list(store.hooks)
    x, ids, labels = _training_rows(store, hooks, cfg.max_rows)
    labels = labels[:, [store.concept_names.index(n) for n in concepts.names]]
    seconds["read"] = time.perf_counter() - t0
    sets, pool = concept_token_sets(ids, labels, concepts.names, cfg.min_token_count,
                                    cfg.min_precision)  # fmt: skip
    lexical = [n for n in concepts.names if concepts.kind[n] == "lexical"]
    skipped = {n: f"{len(sets[n])} tokens with >= {cfg.min_token_count} occurrences labelled "
               f"{n} on >= {cfg.min_precision:.0%} of them, expected >= {cfg.min_tokens}"
               for n in lexical if len(sets[n]) < cfg.min_tokens}  # fmt: skip
    estimated = [n for n in lexical if n not in skipped]
    gamma = unembedding(model_dir)
    strings = token_strings(model_dir, pool)
    spaces: dict[str, dict] = {}
    arrays: dict[str, np.ndarray] = {}
    vocab = gamma.shape[0]
    # unembedding: Cov over the whole vocabulary (Park et al.); the same token sets
    mean, w = whitener(gamma)
    g_u = (gamma - mean) @ w
    t1 = time.perf_counter()
    spaces["unembed"], a = analyse_space("unembed", g_u, gamma, pool, sets, concepts, estimated,
                                         strings, cfg)  # fmt: skip
    arrays.update(a)
    seconds["unembed"] = time.perf_counter() - t1
    centroids: dict[str, dict[str, np.ndarray]] = {}
    for h in hooks:
        t1 = time.perf_counter()
        sums, counts = token_means(x[h], ids, max(vocab, int(ids.max()) + 1))
        means = np.zeros_like(sums)
        means[pool] = sums[pool] / counts[pool, None]
        if all(c in estimated for c in SIMPLEX):  # the simplex's vertices, raw space
            centroids[h] = {c: means[sets[c]].mean(0) for c in SIMPLEX}
        mean, w = whitener(means[pool])
        g = np.zeros_like(means)
        g[pool] = (means[pool] - mean) @ w
        spaces[h], a = analyse_space(h, g, means, pool, sets, concepts, estimated, strings, cfg)
        arrays.update(a)
        seconds[h] = time.perf_counter() - t1
    flat = flat_partition(lexical, sets, concepts.parent)
    clusters: dict[str, dict] = {}
    for h in hooks:
        for name in cfg.sae_names:
            folder = sae_root / h / name
            if not (folder / "cfg.json").exists():
                continue
            t1 = time.perf_counter()
            clusters[f"{h}/{name}"] = clusters_at(store, h, folder, flat, concepts, cfg)
            seconds[f"clusters {h}/{name}"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    steering = steer_along_simplex(model_dir, corpus_dir, centroids, cfg)
    seconds["simplex steering"] = time.perf_counter() - t1
    seconds["total"] = time.perf_counter() - t0
    summary = {
        "method": {
            "vectors": "Park et al. 2024 LDA-style estimator under the causal inner product "
            "(unembedding whitened by its covariance); per hook: whitened per-token mean "
            "residuals (stages/geometry/vectors.py)",
            "rows": int(len(ids)),
            "token_sets": f"tokens with >= {cfg.min_token_count} occurrences labelled with "
            f"the concept on >= {cfg.min_precision:.0%} of them",
            "n_null": cfg.n_null,
            "p": "(1 + #null at least as extreme) / (1 + n), floor 1 / (1 + n)",
        },
        "token_sets": {n: [strings.get(int(t), str(t)) for t in sets[n]] for n in lexical},
        "skipped": skipped,
        "spaces": spaces,
        "flat_partition": flat,
        "clusters": clusters,
        "simplex_steering": steering,
    }
    return GeometryResult(summary, arrays, headline(summary),
                          {k: round(v, 3) for k, v in seconds.items()})  # fmt: skip


def steer_along_simplex(model_dir: Path, corpus_dir: Path,
                        centroids: dict[str, dict[str, np.ndarray]], cfg: GeometryConfig) -> dict:  # fmt: skip
    """Per hook, `stages.geometry.steer.simplex_steering` (mammal -> bird) on the held-out
    documents, or why not."""
    if not centroids:
        return {"skipped": "no simplex: mammal, bird or fish has no vector"}
    from stages.corpus import read_corpus
    from stages.geometry.steer import sentences, simplex_steering
    from stages.models import load_model

    corpus = read_corpus(corpus_dir)
    texts = [t for t, sp in zip(corpus.texts, corpus.splits, strict=True) if sp == "heldout"]
    model = load_model(model_dir)
    sents = sentences(model.tokenizer, texts, "mammal", "bird", model.cfg.n_ctx,
                      cfg.steer_sentences)  # fmt: skip
    return {h: simplex_steering(model, sents, h, c, n_random=cfg.steer_random, seed=cfg.seed)
            for h, c in centroids.items()}  # fmt: skip


def _p(d: dict, key: str) -> dict:
    s = d.get(key) or {}
    return {"stat": s.get("statistic"), "z": s.get("z"), "p": s.get("p")}


def headline(summary: dict) -> dict:
    """The DVC metrics: per space the main statistic of each test, its z and p."""
    out: dict = {"skipped_concepts": len(summary["skipped"])}
    for space, r in summary["spaces"].items():
        m: dict = {}
        o = r.get("orthogonality", {})
        if "mean_abs_cos" in o:
            m["orth_mean_abs_cos"] = o["mean_abs_cos"]
            m["orth_vs_nested"] = _p(o, "null_nested_sets")
            m["orth_vs_random_parent"] = _p(o, "null_random_parent")
        s = r.get("simplex", {})
        if "roundness" in s:
            m["simplex_roundness"] = _p(s, "roundness")
            m["simplex_loo_accuracy"] = _p(s, "loo_accuracy")
        for name, c in r.get("circles", {}).items():
            if "cyclic_order_R" in c:
                m[f"circle_{name}_R"] = _p(c, "cyclic_order_R")
                m[f"circle_{name}_residual"] = _p(c, "circle_residual")
        out[space] = m
    for hook, r in (summary.get("simplex_steering") or {}).items():
        if isinstance(r, dict) and "effect" in r:
            out[f"simplex_steering/{hook}"] = {k: r[k] for k in ("effect", "z", "p", "flip_rate")}
    for key, c in summary["clusters"].items():
        out[f"clusters/{key}"] = {"kmeans": _p(c, "kmeans"), "agglomerative": _p(c, "agglomerative"),
                                  "kmeans_vs_permuted": _p(c, "kmeans_vs_permuted_labels"),
                                  "n_labelled": c["n_labelled"]}  # fmt: skip
    return out


def config_from_params(p) -> GeometryConfig:
    """`GeometryConfig` from the params section (`stages.geometry.config.GeometryParams`)."""
    d = p.model_dump()
    return GeometryConfig(**{**d, "sae_names": tuple(d["sae_names"])})


def write_geometry(result: GeometryResult, out: Path) -> None:
    """`out/geometry.json` (every test, nulls, projections, token sets, skips) and
    `out/vectors.npz` (per space: concept names, vectors, cosine matrix; no pickle)."""
    from stages.io import write_json

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "geometry.json", result.summary)
    np.savez(out / "vectors.npz", **result.arrays)


def read_vectors(folder: Path) -> dict[str, np.ndarray]:
    """What `write_geometry` put in vectors.npz ({"<space>/vectors": ...})."""
    path = Path(folder) / "vectors.npz"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; expected the geometry stage's output")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
