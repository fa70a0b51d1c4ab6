"""Cross-model feature alignment: pure functions on tensors and chunk streams.

Three layers, each usable alone (no DVC, Prefect or MLflow in here):

- `similarity` — how similar are two representations of the same tokens
  (linear CKA streamed exactly, unbiased CKA, mutual kNN, SVCCA, RSA, permutation
  p-values, layer-by-layer matrices);
- `correlation` — streaming Pearson correlation of every latent of SAE A with every
  latent of SAE B, its shuffled-token null, and top-activating tokens per latent;
- `matching` — turning scores into matches (max, Hungarian), null comparison, Jaccard
  of top tokens, Procrustes decoder matching, feature splitting.

A typical pass over a cache, reading each chunk once::

    acts_a = RowChunks(store_a[hook_a], 8192)           # zarr arrays, row-aligned tokens
    corr = CorrelationAccumulator(sae_a.d_sae, sae_b.d_sae)
    for xa, xb in zip(acts_a, acts_b):
        corr.update(sae_a.encode(xa), sae_b.encode(xb))
    matches = hungarian_matches(corr.correlation())
"""

from stages.alignment._common import RowChunks
from stages.alignment.correlation import (
    CorrelationAccumulator,
    TopActivations,
    null_correlation,
    shuffled_chunk_pairs,
    streaming_correlation,
)
from stages.alignment.matching import (
    FeatureSplitting,
    Matches,
    NullComparison,
    compare_to_null,
    decoder_cosine,
    decoder_matches,
    feature_splitting,
    fit_orthogonal_procrustes,
    ground_truth_agreement,
    hungarian_matches,
    max_matches,
    orthogonal_procrustes_map,
    top_token_jaccard,
)
from stages.alignment.similarity import (
    METRICS,
    LayerSimilarity,
    LinearCKAAccumulator,
    PermutationTest,
    SVCCAResult,
    layer_similarity,
    linear_cka,
    mutual_knn,
    permutation_test,
    rsa,
    similarity_scores,
    subsample_rows,
    svcca,
    unbiased_cka,
)

__all__ = [
    "METRICS",
    "CorrelationAccumulator",
    "FeatureSplitting",
    "LayerSimilarity",
    "LinearCKAAccumulator",
    "Matches",
    "NullComparison",
    "PermutationTest",
    "RowChunks",
    "SVCCAResult",
    "TopActivations",
    "compare_to_null",
    "decoder_cosine",
    "decoder_matches",
    "feature_splitting",
    "fit_orthogonal_procrustes",
    "ground_truth_agreement",
    "hungarian_matches",
    "layer_similarity",
    "linear_cka",
    "max_matches",
    "mutual_knn",
    "null_correlation",
    "orthogonal_procrustes_map",
    "permutation_test",
    "rsa",
    "shuffled_chunk_pairs",
    "similarity_scores",
    "streaming_correlation",
    "subsample_rows",
    "svcca",
    "top_token_jaccard",
    "unbiased_cka",
]
