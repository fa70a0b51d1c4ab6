"""`activations` in params.yaml: how every activation store is written, and which hooks
each model caches (`stages/activations/`).

Its own module, pydantic only, so that every stage's params check (stages/config.py)
reads it without importing torch or zarr.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, field_validator, model_validator

from stages.activations.hook_names import check_hook_name
from stages.models_config import ToyModel, a_model
from stages.params_messages import MISSING, KeyProblem
from stages.params_types import PosInt, StrictModel

if TYPE_CHECKING:
    from stages.config import Params


class StoreParams(StrictModel):
    seq_len: Annotated[int, Field(ge=2)] = 128
    batch_size: PosInt = 64
    dtype: Literal["float16", "float32"] = "float16"
    max_train_tokens: PosInt | None = None
    shard_rows: PosInt = 65_536
    chunk_rows: PosInt = 8_192
    # Write stores to object storage (s3://bucket/prefix, gs://..., file:///shared/...)
    # at <url>/<model>/<fingerprint[:16]>/; DVC then tracks a pointer. null: local.
    # Credentials and endpoint come from the environment (AWS_*), never from here.
    url: str | None = None

    @field_validator("url")
    @classmethod
    def _fsspec_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from fsspec.registry import known_implementations

        protocol, sep, rest = v.partition("://")
        expected = "expected an fsspec URL such as 's3://bucket/atlas/activations'"
        if not sep or not rest.strip("/"):
            raise ValueError(f"{expected} (a protocol, then a location)")
        if protocol not in known_implementations:
            raise ValueError(f"{expected} (protocol '{protocol}' is unknown to fsspec)")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _chunks_tile_shards(self) -> StoreParams:
        if self.shard_rows % self.chunk_rows:
            raise KeyProblem(("chunk_rows",), self.chunk_rows,
                            f"expected a divisor of shard_rows = {self.shard_rows}")  # fmt: skip
        return self


class ActivationParams(StrictModel):
    """`store`: how every cache is written; `hooks`: per model, which hook points."""

    store: StoreParams = StoreParams()
    hooks: dict[str, list[str]]

    def check(self, p: Params) -> None:
        """Against `models`: every model's hooks listed, valid for it, and windows that fit."""
        for name, m in p.models.items():
            hooks = self.hooks.get(name)
            loc = ("activations", "hooks", name)
            if hooks is None:
                raise KeyProblem(loc, MISSING, f"expected a list of hooks for model '{name}'")
            if not hooks:
                raise KeyProblem(loc, [], "expected at least one hook")
            if len(set(hooks)) != len(hooks):
                raise KeyProblem(loc, hooks, "expected no repeated hook")
            for i, hook in enumerate(hooks):
                why = check_hook_name(hook, m.n_layers)
                if why:
                    raise KeyProblem((*loc, i), hook, why)
            if isinstance(m, ToyModel) and self.store.seq_len > m.arch.n_ctx:
                raise KeyProblem(
                    ("activations", "store", "seq_len"),
                    self.store.seq_len,
                    f"expected an integer ≤ models.{name}.arch.n_ctx = {m.arch.n_ctx}",
                )
        for name in self.hooks:
            if name not in p.models:
                raise KeyProblem(("activations", "hooks", name), name, a_model(p.models))
