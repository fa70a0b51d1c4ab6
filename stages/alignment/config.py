"""`AlignConfig`: every knob of the `align` stage (`align.config` in params.yaml).

Its own module, free of torch and scipy, so that checking params.yaml (stages/config.py,
at the start of every stage) does not import the alignment machinery.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class AlignConfig:
    """Every knob of `align_pair` (the `align` params schema mirrors it)."""

    hook_pairs: tuple[tuple[str, str], ...] | None = None  # None: hooks cached by both
    # SAEs matched by name (A's SAE "x" with B's SAE "x") on each compared hook pair; None:
    # the first name (sorted) both models have per hook; "all": every shared name. SAEs
    # on both sides of a hook pair with no name in common are an error, not zero pairs.
    sae_names: tuple[str, ...] | str | None = None
    split: str = "heldout"  # rows of A to use: heldout | train | all
    max_tokens: int = 200_000  # heldout topped up with the nearest training rows
    chunk_rows: int = 8192  # tokens per streamed chunk (rounded to the zarr chunking)
    threshold: float = 0.5  # a feature "has a partner" when its match correlates ≥ this
    n_null: int = 1  # shuffled-token-order null passes
    null_quantile: float = 0.99  # matched scores beat this quantile of the null's
    top_k: int = 20  # top-activating tokens per latent, for the Jaccard check
    n_permutations: int = 100  # permutation p-values of the similarity measures
    n_samples: int = 2048  # subsample for mutual kNN, RSA, unbiased CKA, SVCCA, p-values
    knn_k: int = 10
    self_check_tokens: int = 16_384  # tokens for the SAE-with-itself sanity check
    # The pass over the tokens runs as n_parts contiguous ranges of chunks whose float64
    # accumulators are merged in order: on Dask workers or one after another, the same
    # numbers either way (the result depends on n_parts, never on the runner).
    n_parts: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        ints = {"max_tokens": 2, "chunk_rows": 1, "n_null": 1, "top_k": 1, "n_permutations": 0,
                "n_samples": self.knn_k + 2, "knn_k": 1, "self_check_tokens": 2,
                "n_parts": 1, "seed": 0}  # fmt: skip
        for name, low in ints.items():
            if getattr(self, name) < low:
                raise ValueError(
                    f"align: {name} = {getattr(self, name)}, expected an integer >= {low}"
                )
        if not 0.0 < self.null_quantile < 1.0:
            raise ValueError(f"align: null_quantile = {self.null_quantile}, expected in (0, 1)")
        if self.split not in ("heldout", "train", "all"):
            raise ValueError(f"align: split = {self.split!r}, expected heldout, train or all")

    @classmethod
    def from_params(cls, params: Mapping[str, object]) -> AlignConfig:
        """From a params.yaml mapping (lists where the dataclass has tuples)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"align: unknown keys {unknown}; expected some of {sorted(known)}")
        values = dict(params)
        if values.get("hook_pairs") is not None:
            values["hook_pairs"] = tuple(tuple(p) for p in values["hook_pairs"])  # type: ignore[attr-defined]
        if isinstance(values.get("sae_names"), list):
            values["sae_names"] = tuple(values["sae_names"])  # type: ignore[arg-type]
        return cls(**values)  # type: ignore[arg-type]
