"""`corpus` in params.yaml: where the documents come from (`stages/corpus.py`).

Its own module, pydantic only, so that every stage's params check (stages/config.py)
reads it without importing the corpus machinery (pyarrow, datasets).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from stages.params_messages import MISSING, KeyProblem
from stages.params_types import Fraction, PosInt, Seed, StrictModel


class ToyCorpus(StrictModel):
    """The embedded story generator with planted concepts (stages/corpus.py)."""

    n_docs: PosInt = 8000
    seed: Seed = 0


class HFCorpus(StrictModel):
    """Any HF `datasets` source: a hub dataset id (streamed) or a builder over local files."""

    path: str = Field(description="'text', 'json', 'parquet' or a hub dataset id")
    data_files: list[str] = []
    name: str | None = None
    split: str = "train"
    text_field: str = "text"
    streaming: bool = False
    max_docs: PosInt | None = None


class CorpusParams(StrictModel):
    source: Literal["toy", "hf"] = "toy"
    heldout_fraction: Fraction = 0.05
    toy: ToyCorpus = ToyCorpus()
    hf: HFCorpus | None = None

    @model_validator(mode="after")
    def _source_has_section(self) -> CorpusParams:
        if self.source == "hf" and self.hf is None:
            raise KeyProblem(("hf",), MISSING, "expected an hf section when source is 'hf'")
        return self
