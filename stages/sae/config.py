"""Typed configuration of every SAE architecture, and the registry of their names.

`SAEConfig` is the shared part; each architecture's subclass below pins `architecture`
to its registry name and adds its own hyper-parameters under the names the papers use
(`k`, `auxk_coefficient`, `l1_coefficient`, `l0_coefficient`, ...). `parse_sae_config`
picks the subclass from the `architecture` key, so a `params.yaml` entry is one flat
mapping.

The configs live here, not beside their SAE modules, because the params check of every
stage reads them: this module imports only pydantic, so the DVC stages that validate
params (all of them) depend on this file, not on the SAE maths (see dvc.yaml).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from stages.layout import why_unsafe


class SAEConfig(BaseModel):
    """Everything needed to build and train one SAE (shared part).

    Sizes: give `d_sae` or `expansion_factor` (d_sae = round(expansion_factor * d_in)).
    `d_in` may be left out and is then taken from the activation source; when it is
    given and differs from the source, training stops with an error naming both.

    Schedules are in optimizer steps except `n_training_tokens` and
    `dead_feature_window` (tokens).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: str
    name: str | None = Field(default=None, description="folder name; derived if None")
    d_in: int | None = Field(default=None, ge=1)
    d_sae: int | None = Field(default=None, ge=1)
    expansion_factor: float | None = Field(default=None, gt=0)

    # optimisation
    lr: float = Field(default=3e-4, gt=0)
    adam_beta1: float = Field(default=0.9, ge=0, lt=1)
    adam_beta2: float = Field(default=0.999, ge=0, lt=1)
    lr_warmup_steps: int = Field(default=0, ge=0)
    lr_decay_fraction: float = Field(
        default=0.2, ge=0, le=1, description="linear decay to 0 over this final fraction"
    )
    sparsity_warmup_steps: int = Field(default=0, ge=0)
    grad_clip_norm: float | None = Field(default=1.0, gt=0)
    batch_size: int = Field(default=4096, ge=1)
    n_training_tokens: int = Field(ge=1)
    seed: int = Field(default=0, ge=0, lt=2**32)  # numpy refuses a negative seed

    # data handling
    normalize_activations: bool = True
    b_dec_init: Literal["mean", "geometric_median", "zeros"] = "geometric_median"
    dead_feature_window: int = Field(
        default=1_000_000, ge=1, description="a latent silent for this many tokens is dead"
    )

    @field_validator("name")
    @classmethod
    def _folder_name(cls, v: str | None) -> str | None:
        # the SAE's folder: data/saes/<model>/<hook>/<name>/
        if v is not None and (why := why_unsafe(v)):
            raise ValueError(why)
        return v

    @model_validator(mode="after")
    def _check_sizes(self) -> SAEConfig:
        where = f"SAE config '{self.name or self.architecture}'"
        if self.d_sae is None and self.expansion_factor is None:
            raise ValueError(f"{where}: give d_sae or expansion_factor, got neither")
        if self.d_sae is not None and self.expansion_factor is not None:
            if self.d_in is None or self.d_sae != round(self.expansion_factor * self.d_in):
                raise ValueError(
                    f"{where}: d_sae = {self.d_sae} and expansion_factor = "
                    f"{self.expansion_factor} disagree; give only one"
                )
        if self.n_training_tokens < self.batch_size:
            raise ValueError(
                f"{where}: n_training_tokens = {self.n_training_tokens} is less than one "
                f"batch (batch_size = {self.batch_size})"
            )
        return self

    # ---- derived values -------------------------------------------------------------
    @property
    def width(self) -> int:
        """The dictionary size d_sae (needs d_in when given as an expansion factor)."""
        if self.d_sae is not None:
            return self.d_sae
        if self.d_in is None:
            raise ValueError(
                f"SAE config '{self.name or self.architecture}': d_in is unknown, so "
                f"expansion_factor = {self.expansion_factor} cannot give d_sae yet"
            )
        return max(1, round(self.expansion_factor * self.d_in))  # type: ignore[operator]

    @property
    def n_steps(self) -> int:
        return self.n_training_tokens // self.batch_size

    @property
    def display_name(self) -> str:
        """`name`, or e.g. `topk-4096-k32` built from the architecture, size and sparsity."""
        if self.name:
            return self.name
        size = str(self.d_sae) if self.d_sae is not None else f"x{self.expansion_factor:g}"
        return "-".join(p for p in (self.architecture, size, self.sparsity_tag()) if p)

    def sparsity_tag(self) -> str:
        """Short text naming the sparsity setting; architectures override it."""
        return ""

    def with_d_in(self, d_in: int, source_name: str = "the activation source") -> SAEConfig:
        """Return a copy with `d_in` filled from the data (and checked against it)."""
        if self.d_in is not None and self.d_in != d_in:
            raise ValueError(
                f"SAE config '{self.display_name}': d_in = {self.d_in}, but {source_name} "
                f"has d_in = {d_in} (activation width); they must match"
            )
        update: dict[str, object] = {"d_in": d_in}
        if self.d_sae is None:
            update["d_sae"] = max(1, round(self.expansion_factor * d_in))  # type: ignore[operator]
            update["expansion_factor"] = None
        return self.model_copy(update=update)

    def lr_at(self, step: int) -> float:
        """Linear warm-up, constant, then linear decay to 0 over the final fraction."""
        n = self.n_steps
        factor = 1.0
        if self.lr_warmup_steps > 0 and step < self.lr_warmup_steps:
            factor = (step + 1) / self.lr_warmup_steps
        decay_steps = math.floor(self.lr_decay_fraction * n)
        if decay_steps > 0 and step >= n - decay_steps:
            factor = min(factor, (n - step) / decay_steps)
        return self.lr * factor

    def sparsity_scale_at(self, step: int) -> float:
        """Multiplier in [0, 1] on the sparsity coefficient (linear warm-up)."""
        if self.sparsity_warmup_steps <= 0:
            return 1.0
        return min(1.0, (step + 1) / self.sparsity_warmup_steps)


# ---- the architectures' own hyper-parameters -----------------------------------------


class ReLUConfig(SAEConfig):
    """Anthropic's April-2024 update (`stages/sae/relu.py`)."""

    architecture: Literal["relu"] = "relu"
    l1_coefficient: float = Field(default=5.0, ge=0, description="λ in the update")
    decoder_init_norm: float = Field(default=0.1, gt=0)

    def sparsity_tag(self) -> str:
        return f"l1c{self.l1_coefficient:g}"


class TopKConfig(SAEConfig):
    """Gao et al. 2024 (`stages/sae/topk.py`)."""

    architecture: Literal["topk"] = "topk"
    k: int = Field(ge=1)
    auxk_coefficient: float = Field(default=1 / 32, ge=0)
    k_aux: int | None = Field(default=None, ge=1, description="default d_in // 2")
    use_sparse_kernels: bool = True

    @model_validator(mode="after")
    def _k_fits(self) -> TopKConfig:
        if self.d_sae is not None and self.k > self.d_sae:
            raise ValueError(
                f"SAE config '{self.display_name}': k = {self.k} exceeds d_sae = {self.d_sae}"
            )
        return self

    def sparsity_tag(self) -> str:
        return f"k{self.k}"


class BatchTopKConfig(SAEConfig):
    """Bussmann et al. 2024 (`stages/sae/batchtopk.py`)."""

    architecture: Literal["batchtopk"] = "batchtopk"
    k: float = Field(gt=0, description="mean number of active latents per token")
    auxk_coefficient: float = Field(default=1 / 32, ge=0)
    k_aux: int | None = Field(default=None, ge=1, description="default d_in // 2")
    threshold_momentum: float = Field(default=0.01, gt=0, le=1)

    def sparsity_tag(self) -> str:
        return f"k{self.k:g}"


class JumpReLUConfig(SAEConfig):
    """Rajamanoharan et al. 2024b (`stages/sae/jumprelu.py`)."""

    architecture: Literal["jumprelu"] = "jumprelu"
    l0_coefficient: float = Field(default=0.05, ge=0, description="λ on the L0 penalty")
    bandwidth: float = Field(default=0.05, gt=0, description="STE kernel width ε")
    threshold_init: float = Field(default=0.05, gt=0)

    def sparsity_tag(self) -> str:
        return f"l0c{self.l0_coefficient:g}"


class GatedConfig(SAEConfig):
    """Rajamanoharan et al. 2024a (`stages/sae/gated.py`)."""

    architecture: Literal["gated"] = "gated"
    l1_coefficient: float = Field(default=0.5, ge=0, description="λ on ‖ReLU(π_gate)‖₁")

    def sparsity_tag(self) -> str:
        return f"l1c{self.l1_coefficient:g}"


# name -> config class, every subclass above; `stages.sae.ARCHITECTURES`
# (stages/sae/registry.py) maps the same names to the SAE modules
CONFIGS: dict[str, type[SAEConfig]] = {
    c.model_fields["architecture"].default: c for c in SAEConfig.__subclasses__()
}


def config_class(architecture: str) -> type[SAEConfig]:
    try:
        return CONFIGS[architecture]
    except KeyError:
        raise ValueError(
            f"unknown SAE architecture '{architecture}', expected one of {sorted(CONFIGS)}"
        ) from None


def parse_sae_config(raw: dict[str, Any] | SAEConfig) -> SAEConfig:
    """Validate one SAE entry (e.g. from params.yaml) into its architecture's config."""
    if isinstance(raw, SAEConfig):
        return raw
    if "architecture" not in raw:
        raise ValueError(
            f"SAE config {raw!r}: missing key 'architecture', expected one of {sorted(CONFIGS)}"
        )
    return config_class(raw["architecture"]).model_validate(raw)
