"""Cross-model feature alignment: pure functions on tensors and chunk streams.

Entry points for the `align` stage (no DVC, Prefect or MLflow in here)::

    from stages.activations import ActivationStore
    from stages.alignment import AlignConfig, align_pair, figures, write_alignment
    from stages.sae.io import load_model_saes

    store_a = ActivationStore(Path("data/activations/toy-a"))
    store_b = ActivationStore(Path("data/activations/toy-b"))
    saes_a, best_a = load_model_saes(Path("data/saes/toy-a"))   # hook -> name -> SAE, + concepts
    saes_b, best_b = load_model_saes(Path("data/saes/toy-b"))
    result = align_pair(store_a, store_b, saes_a, saes_b, AlignConfig(),
                        best_latents_a=best_a, best_latents_b=best_b)
    write_alignment(result, Path("data/alignment/toy-a__toy-b"))  # scores.json = metrics
    for name, fig in figures(result).items(): ...                # log / save them

- `align_pair(store_a, store_b, saes_a, saes_b, cfg, *, best_latents_a, best_latents_b,
  progress) -> AlignmentResult`: token alignment, one streaming pass, matching and
  scores (`stream.py`, the one streamed pass; every knob is a field of `AlignConfig`, with defaults;
  `AlignConfig.from_params(mapping)` builds it from a params.yaml section);
  `AlignmentResult.scores` is the flat dict of headline numbers (plain floats).
  `saes_a` / `saes_b` map hook -> SAE name -> SAE, and SAEs are paired by name: on each
  compared hook pair, A's SAE "x" is matched with B's SAE "x" (`cfg.sae_names` picks
  which names; default the first shared one). To compare two SAEs of different names,
  give them the same key, e.g. `{hook: {"s": sae_seed0}}` and `{hook: {"s": sae_seed1}}`.
  A hook with SAEs on one side only is compared on raw activations; SAEs on both sides
  with no name in common raise a ValueError.
- `write_alignment(result, out_dir) -> Path` and `figures(result) -> dict[str, Figure]`
  (`outputs.py`, which documents the files).
- `align_tokens(store_a, store_b) -> TokenAlignment`: which rows hold the same token
  (`tokens.py`: row by row for one tokenizer, shared character offsets otherwise).
- `transfer_vector(v_a, sae_a, sae_b, matches, k=None, method="nnls")`: carry a steering
  vector from A to B through matched features, and `evaluate_transfer(model_b, set, hook,
  own, carried, multipliers, n_random=32)`: does it steer B, against B's own vector and
  random directions of the same norm (`transfer.py`).

Three layers below them, each usable alone:

- `similarity` — how similar are two representations of the same tokens
  (linear CKA streamed exactly, unbiased CKA, mutual kNN, SVCCA, RSA, permutation
  p-values, layer-by-layer matrices);
- `correlation` — streaming Pearson correlation of every latent of SAE A with every
  latent of SAE B, its shuffled-token null, and top-activating tokens per latent
  (`TopTokens`: distinct vocabulary ids by max activation);
- `matching` — turning scores into matches (max, Hungarian), null comparison, Jaccard
  of top tokens (and its all-pairs chance level), Procrustes decoder matching, feature
  splitting;
- `pvalues` — the floor of an empirical p, the normal tail of a permutation null, Holm.

A typical pass over two caches of one tokenizer (row i of A and row i of B hold the same
token; `align_tokens` pairs the rows otherwise), reading each chunk once::

    import torch
    from stages.alignment import CorrelationAccumulator, RowChunks, hungarian_matches

    acts_a = RowChunks(store_a.array(hook_a), 8192)     # [≤8192, d] numpy chunks (zarr)
    acts_b = RowChunks(store_b.array(hook_b), 8192)
    corr = CorrelationAccumulator(sae_a.d_sae, sae_b.d_sae)
    with torch.no_grad():                                # SAE weights require grad
        for xa, xb in zip(acts_a, acts_b, strict=True):
            fa = sae_a.encode(torch.from_numpy(xa).float())  # float16 on disk
            fb = sae_b.encode(torch.from_numpy(xb).float())
            corr.update(fa, fb)
    matches = hungarian_matches(corr.correlation())
"""

from stages.lazy import lazy_exports

# Names exported here, by the submodule defining them; each is imported on first use
# (PEP 562), so that a light submodule (`stages.alignment.config`, read by every stage's
# params check) does not pull in torch, scipy and matplotlib through this package.
_EXPORTS = {
    "stream": "align_pair AlignmentResult gather_rows SAEPairResult",
    "config": "AlignConfig",
    "outputs": "figures write_alignment",
    "tokens": "align_offsets align_tokens select_rows TokenAlignment",
    "transfer": (
        "decompose_vector evaluate_transfer read_hungarian transfer_headline "
        "transfer_steering transfer_vector TransferTest"
    ),
    "similarity": (
        "layer_similarity LayerSimilarity linear_cka LinearCKAAccumulator METRICS "
        "mutual_knn permutation_test PermutationTest rsa similarity_scores "
        "subsample_rows svcca SVCCAResult unbiased_cka"
    ),
    "correlation": (
        "CorrelationAccumulator null_correlation shuffled_chunk_pairs "
        "streaming_correlation TopActivations TopTokens"
    ),
    "matching": (
        "compare_to_null decoder_cosine decoder_matches feature_splitting "
        "FeatureSplitting fit_orthogonal_procrustes ground_truth_agreement "
        "hungarian_matches Matches max_matches NullComparison "
        "mean_jaccard_all_pairs orthogonal_procrustes_map shared_vocabulary top_token_jaccard"
    ),
    "inputs": "RowChunks",
    "pvalues": "empirical_p holm normal_tail p_floor",
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
