"""What every params section is built from: the strict base model and the number types.

Each section of `params.yaml` is a pydantic model beside the code that uses it
(`stages/corpus_config.py`, `stages/sae/config.py`, ...); `stages/config.py` assembles
them into `Params`. Light on purpose (pydantic only): every stage's params check imports it.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class StrictModel(BaseModel):
    """A params section: unknown keys are errors, values are frozen and strictly typed."""

    # strict: `d_model: true` or `n_docs: "8"` is a mistake, not 1 or 8 (an integer is
    # still a valid number)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(gt=0, lt=1)]
# what every RNG here takes: numpy refuses a negative seed (hours into a stage), and its
# legacy global seed one of 2**32 or more
Seed = Annotated[int, Field(ge=0, lt=2**32)]
