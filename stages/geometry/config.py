"""`geometry` in params.yaml: the concept-geometry stage (`stages/geometry/`,
`flows/geometry.py`).

Its own module, pydantic only, so that every stage's params check (stages/config.py)
reads it without importing numpy, scipy or torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stages.layout import why_unsafe
from stages.params_messages import KeyProblem
from stages.params_types import Fraction, PosInt, Seed, StrictModel

if TYPE_CHECKING:
    from stages.config import Params


class GeometryParams(StrictModel):
    """Knobs of `geometry@M` (`stages.geometry.run.GeometryConfig` mirrors them)."""

    # training rows read from the start of the store for per-token means (None: all)
    max_rows: PosInt | None = 262_144
    # a token joins a concept's token set when it occurs this often in those rows ...
    min_token_count: PosInt = 8
    # ... and carries the concept's label on at least this fraction of its occurrences
    min_precision: Fraction = 0.9
    # a concept with fewer tokens gets no vector (skipped, and the skip recorded)
    min_tokens: PosInt = 3
    n_null: PosInt = 200  # draws of each null (p floor 1 / (n_null + 1))
    n_null_clusters: PosInt = 10  # random-direction draws of the cluster-purity null
    # SAEs whose decoder directions are clustered, at every hook that has one
    sae_names: list[str] = ["topk-1024-k16"]
    cluster_rows: PosInt = 32_768  # held-out rows encoded to give each latent its concept
    # simplex steering (stages/geometry/steer.py): held-out mammal sentences moved along
    # the mammal -> bird edge at every hook, against this many random directions
    steer_sentences: PosInt = 32
    steer_random: PosInt = 32
    seed: Seed = 0

    def check(self, p: Params) -> None:
        for i, name in enumerate(self.sae_names):
            if why := why_unsafe(name):
                raise KeyProblem(("geometry", "sae_names", i), name, why)
