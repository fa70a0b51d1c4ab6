"""`models` in params.yaml: toy models trained here and pretrained ones loaded by name
(`stages/models.py`).

Its own module, pydantic only, so that every stage's params check (stages/config.py)
reads it without importing torch or TransformerLens.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from stages.activations.hook_names import check_hook_name, hook_width
from stages.layout import why_unsafe
from stages.params_messages import KeyProblem
from stages.params_types import NonNegInt, PosFloat, PosInt, Seed, StrictModel


class ToyArch(StrictModel):
    n_layers: PosInt = 2
    d_model: PosInt = 128
    n_heads: PosInt = 4
    d_mlp: PosInt = 512
    n_ctx: PosInt = 128
    act_fn: Literal["gelu", "relu", "gelu_new", "silu"] = "gelu"
    # standard: learned absolute positions | rotary: RoPE on queries and keys (Su et al.
    # 2021, "RoFormer"), relative offsets, no hook_pos_embed
    positional: Literal["standard", "rotary"] = "standard"

    @model_validator(mode="after")
    def _heads_divide(self) -> ToyArch:
        if self.d_model % self.n_heads:
            raise KeyProblem(("n_heads",), self.n_heads,
                            f"expected a divisor of d_model = {self.d_model}")  # fmt: skip
        return self


class ToyTokenizer(StrictModel):
    vocab_size: Annotated[int, Field(ge=260)] = 1024


class ToyTrain(StrictModel):
    # 0: no training at all, the architecture and seed at initialisation (an untrained
    # control model that goes through the pipeline like any other)
    tokens: NonNegInt = 600_000
    batch_size: PosInt = 32
    seq_len: PosInt = 128
    lr: PosFloat = 3e-3
    warmup_steps: NonNegInt = 30
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    eval_tokens: PosInt = 32_768
    # hooked: HookedTransformer's own forward | fused: the same loss in fewer kernels,
    # ~1.5x faster on CPU, equal up to float rounding (stages/lm_fused.py)
    engine: Literal["hooked", "fused"] = "hooked"


class ToyModel(StrictModel):
    """A small HookedTransformer trained here by the `lm` stage (no network)."""

    source: Literal["toy"]
    seed: Seed = 0
    arch: ToyArch = ToyArch()
    tokenizer: ToyTokenizer = ToyTokenizer()
    train: ToyTrain = ToyTrain()

    @property
    def n_layers(self) -> int | None:
        return self.arch.n_layers

    @model_validator(mode="after")
    def _seq_fits(self) -> ToyModel:
        if self.train.seq_len > self.arch.n_ctx:
            raise KeyProblem(("train", "seq_len"), self.train.seq_len,
                            f"expected an integer ≤ arch.n_ctx = {self.arch.n_ctx}")  # fmt: skip
        return self

    def hook_width(self, hook: str) -> int | None:
        """Width of a hook's activations (None for a hook name the stage refuses)."""
        if check_hook_name(hook, self.n_layers):
            return None
        return hook_width(hook, self.arch.d_model, self.arch.d_mlp)


class PretrainedModel(StrictModel):
    """A TransformerLens model loaded by name; needs the HF hub or a filled HF cache."""

    source: Literal["pretrained"]
    name: str
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"

    @property
    def n_layers(self) -> int | None:
        return None  # known only once the config is loaded

    def hook_width(self, hook: str) -> None:
        return None  # known only once the config is loaded


ModelParams = Annotated[ToyModel | PretrainedModel, Field(discriminator="source")]


def check_models(models: dict[str, ToyModel | PretrainedModel]) -> None:
    """At least one model, each named as a folder (data/models/<name>/, ...)."""
    if not models:
        raise KeyProblem(("models",), models, "expected at least one model")
    for name in models:
        if why := why_unsafe(name):
            raise KeyProblem(("models", name), name, why)


def a_model(models: dict[str, ToyModel | PretrainedModel]) -> str:
    """What a key naming a model expects."""
    return f"expected a model listed under models ({', '.join(models)})"
