"""Typed configuration of every SAE architecture, the registry of their names, and the
`saes` section of params.yaml. (Over 500 lines: one pydantic model per architecture plus
the section's cross-checks; splitting them would spread one schema over several files
that every stage imports.)

`SAEConfig` is the shared part; each architecture's subclass below pins `architecture`
to its registry name and adds its own hyper-parameters under the names the papers use
(`k`, `auxk_coefficient`, `l1_coefficient`, `l0_coefficient`, ...). `parse_sae_config`
picks the subclass from the `architecture` key, so a `params.yaml` entry is one flat
mapping. `SAEParams` is the `saes` section: evaluation, checkpoints, and per model the
sweep of {hooks, saes} groups.

The configs live here, not beside their SAE modules, because the params check of every
stage reads them: this module imports only pydantic, so the DVC stages that validate
params (all of them) depend on this file, not on the SAE maths (see dvc.yaml).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from stages.layout import why_unsafe
from stages.models_config import a_model
from stages.params_messages import MISSING, NO_VALUE, KeyProblem, Said, dotted, message, or_list
from stages.params_types import PosInt, StrictModel

if TYPE_CHECKING:
    from stages.config import Params


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
    use_sparse_kernels: bool = Field(
        default=True,
        description="CPU: train through sparse kernels where the code is sparse (TopK "
        "always; relu, gated and jumprelu on batches where few latents are active)",
    )

    # sparsity calibration (stages/sae/calibrate.py), for the architectures whose L0 is
    # set by a penalty coefficient (`sparsity_coefficient` names it): short runs search
    # that coefficient, in log space, until their L0 is within `calibration_tolerance`
    # of `target_l0`; the full run then trains at the coefficient found
    sparsity_coefficient: ClassVar[str | None] = None  # e.g. "l1_coefficient"
    target_l0: float | None = Field(
        default=None, gt=0, description="calibrate the sparsity coefficient to this L0"
    )
    calibration_tokens: int | None = Field(
        default=None, ge=1, description="tokens per calibration run; default 1/4 of training"
    )
    calibration_runs: int = Field(default=0, ge=0, description="most calibration runs")
    calibration_tolerance: float = Field(
        default=0.05, gt=0, lt=1, description="stop at |L0 / target_l0 - 1| within this"
    )
    l0_control_rate: float = Field(
        default=0.05, ge=0, description="dual-ascent rate on log λ in the full run (0: off)"
    )
    l0_control: Literal["trend", "reference"] = Field(
        default="trend",
        description="the full run's controller steers L0 onto the target (trend) or onto "
        "a path that reaches it at the end of the run (reference; relu's default)",
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

        def problem(why: str) -> KeyProblem:  # about the entry as a whole
            return KeyProblem((), NO_VALUE, why, text=f"{where}: {why}")

        if self.d_sae is None and self.expansion_factor is None:
            raise problem("give d_sae or expansion_factor, got neither")
        if self.d_sae is not None and self.expansion_factor is not None:
            if self.d_in is None or self.d_sae != round(self.expansion_factor * self.d_in):
                raise problem(
                    f"d_sae = {self.d_sae} and expansion_factor = "
                    f"{self.expansion_factor} disagree; give only one"
                )
        if self.n_training_tokens < self.batch_size:
            raise problem(
                f"n_training_tokens = {self.n_training_tokens} is less than one "
                f"batch (batch_size = {self.batch_size})"
            )
        self._check_calibration(where)
        return self

    def _check_calibration(self, where: str) -> None:
        t = _as_written(self.target_l0)
        if t is not None and self.sparsity_coefficient is None:
            raise KeyProblem(
                ("target_l0",), t,
                f"expected no target_l0 for a {self.architecture} SAE (its L0 is set by k)",
                text=f"{where}: target_l0 = {t:g}, but a {self.architecture} SAE's L0 is set "
                "by k; target_l0 is for relu, gated and jumprelu",
            )  # fmt: skip
        if t is not None and self.d_sae is not None and t >= self.d_sae:
            raise KeyProblem(
                ("target_l0",), t, f"expected less than d_sae = {self.d_sae}",
                text=f"{where}: target_l0 = {t:g} is not less than d_sae = {self.d_sae}",
            )  # fmt: skip
        n = self.calibration_tokens
        if n is not None and not self.batch_size <= n <= self.n_training_tokens:
            expected = (
                f"expected at least one batch (batch_size = {self.batch_size})"
                if n < self.batch_size
                else f"expected at most n_training_tokens = {self.n_training_tokens}"
            )
            raise KeyProblem(
                ("calibration_tokens",), n, expected,
                text=f"{where}: calibration_tokens = {n}, {expected}",
            )  # fmt: skip

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
        """`name`, or e.g. `topk-4096-k32` built from the architecture, size and sparsity
        (`relu-1024-l0t16` for a calibrated SAE: its target, not the coefficient found)."""
        if self.name:
            return self.name
        size = str(self.d_sae) if self.d_sae is not None else f"x{self.expansion_factor:g}"
        tag = f"l0t{self.target_l0:g}" if self.target_l0 is not None else self.sparsity_tag()
        return "-".join(p for p in (self.architecture, size, tag) if p)

    @property
    def calibration_steps(self) -> int:
        """Optimizer steps of one calibration run."""
        tokens = self.calibration_tokens or self.n_training_tokens // 4
        return max(1, tokens // self.batch_size)

    def coefficient(self) -> float:
        """The value of the sparsity coefficient (`sparsity_coefficient` names it)."""
        if self.sparsity_coefficient is None:
            raise ValueError(f"a {self.architecture} SAE has no sparsity coefficient")
        return float(getattr(self, self.sparsity_coefficient))

    def sparsity_tag(self) -> str:
        """Short text naming the sparsity setting; architectures override it."""
        return ""

    @property
    def intended_l0(self) -> float | None:
        """The L0 this SAE is built to have: `target_l0`, or k for TopK / BatchTopK."""
        return self.target_l0

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
    sparsity_coefficient: ClassVar[str | None] = "l1_coefficient"
    l0_control: Literal["trend", "reference"] = "reference"
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

    @model_validator(mode="after")
    def _k_fits(self) -> TopKConfig:
        if self.d_sae is not None and self.k > self.d_sae:
            raise KeyProblem(
                ("k",), self.k, f"expected at most d_sae = {self.d_sae}",
                text=f"SAE config '{self.display_name}': k = {self.k} exceeds d_sae = {self.d_sae}",
            )  # fmt: skip
        return self

    def sparsity_tag(self) -> str:
        return f"k{self.k}"

    @property
    def intended_l0(self) -> float | None:
        return float(self.k)


class BatchTopKConfig(SAEConfig):
    """Bussmann et al. 2024 (`stages/sae/batchtopk.py`)."""

    architecture: Literal["batchtopk"] = "batchtopk"
    k: float = Field(gt=0, description="mean number of active latents per token")
    auxk_coefficient: float = Field(default=1 / 32, ge=0)
    k_aux: int | None = Field(default=None, ge=1, description="default d_in // 2")
    threshold_momentum: float = Field(default=0.01, gt=0, le=1)

    def sparsity_tag(self) -> str:
        return f"k{self.k:g}"

    @property
    def intended_l0(self) -> float | None:
        return float(self.k)


class JumpReLUConfig(SAEConfig):
    """Rajamanoharan et al. 2024b (`stages/sae/jumprelu.py`)."""

    architecture: Literal["jumprelu"] = "jumprelu"
    sparsity_coefficient: ClassVar[str | None] = "l0_coefficient"
    l0_coefficient: float = Field(default=0.05, ge=0, description="λ on the L0 penalty")
    bandwidth: float = Field(default=0.05, gt=0, description="STE kernel width ε")
    threshold_init: float = Field(default=0.05, gt=0)
    pre_act_coefficient: float = Field(
        default=0.0, ge=0, description="λ_p on the dead latents' pre-activation loss"
    )

    def sparsity_tag(self) -> str:
        return f"l0c{self.l0_coefficient:g}"


class GatedConfig(SAEConfig):
    """Rajamanoharan et al. 2024a (`stages/sae/gated.py`)."""

    architecture: Literal["gated"] = "gated"
    sparsity_coefficient: ClassVar[str | None] = "l1_coefficient"
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


# ---- the `saes` section of params.yaml -------------------------------------------------


class SAEEval(StrictModel):
    """Evaluation, always on the held-out split."""

    max_rows: PosInt | None = 65_536  # rows for reconstruction metrics and ground truth
    ce_windows: PosInt = 64  # windows for CE loss recovered / KL with the SAE spliced in
    random_draws: PosInt = 16  # Gurnee's null: random perturbations of the SAE error's norm
    random_windows: PosInt = 16  # ... drawn on the first this many of the ce_windows
    sparse_probing: bool = True  # k-sparse probing, absorption (stages/sae/concepts.py)


class SAESweep(StrictModel):
    """A group of a model's sweep: cached hooks x SAEs (each SAE is trained on every hook).

    Each SAE entry is one flat mapping validated by its architecture's config class
    above (`architecture`, `name`, `expansion_factor` or `d_sae`, `k`, ...).
    """

    hooks: list[str]
    saes: list[dict[str, Any]]


# One {hooks, saes} group or a list of them, told apart by the value's type (a tagged
# union: errors name the group, not every member pydantic tried).
SweepGroups = Annotated[
    Union[Annotated[SAESweep, Tag("group")], Annotated[list[SAESweep], Tag("groups")]],  # noqa: UP007
    Discriminator(lambda v: "groups" if isinstance(v, list) else "group"),
]


class PretrainedSAE(StrictModel):
    """An SAE trained elsewhere, used wherever a trained SAE is named (steering's
    decomposition and downstream effects, alignment, dashboards, `atlas features`).

    One of two sources:
    - `release` + `sae_id`: SAELens' pretrained registry (`pretrained_saes.yaml`), e.g.
      `gpt2-small-res-jb` / `blocks.8.hook_resid_pre`; the files come from the Hugging
      Face hub or the HF cache (`HF_HOME`, `HF_HUB_OFFLINE=1` to forbid downloads);
    - `path`: a local SAELens-format folder (`cfg.json` + `sae_weights.safetensors`).

    The saes stage evaluates it on the model's held-out activations like a trained SAE
    and writes it to `data/saes/<model>/<hook>/<name>/` (`stages.sae.io.resolve_pretrained_sae`).
    """

    hook: str  # the TransformerLens hook it reads (and must be cached)
    release: str | None = None
    sae_id: str | None = None
    path: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> PretrainedSAE:
        registry = self.release is not None or self.sae_id is not None
        if registry and self.path is not None:
            raise KeyProblem(("path",), self.path, "expected either path or release + sae_id, "
                             "not both")  # fmt: skip
        if not registry and self.path is None:
            raise KeyProblem((), NO_VALUE, "expected a source: release + sae_id (SAELens' "
                             "pretrained registry) or path (a local SAELens-format folder)")  # fmt: skip
        for key in ("release", "sae_id"):
            if registry and getattr(self, key) is None:
                raise KeyProblem((key,), MISSING, "expected it beside "
                                 f"{'sae_id' if key == 'release' else 'release'} (SAELens "
                                 "names a pretrained SAE by release and id)")  # fmt: skip
        return self

    def source(self) -> str:
        """What it is, in words: `release/sae_id` or the folder."""
        return f"{self.release}/{self.sae_id}" if self.path is None else f"folder {self.path}"


class SAEParams(StrictModel):
    eval: SAEEval = SAEEval()
    checkpoint_every: PosInt = 200  # optimizer steps between resumable checkpoints
    # per model: one {hooks, saes} group, or a list of groups (e.g. the full architecture
    # sweep on one hook and a single SAE on every other hook); [] when it only uses
    # pretrained SAEs
    sweep: dict[str, SweepGroups]
    # per model: SAE name (its folder name) -> a pretrained SAE (PretrainedSAE above)
    pretrained: dict[str, dict[str, PretrainedSAE]] = {}

    def groups(self, model: str) -> list[SAESweep]:
        s = self.sweep[model]
        return s if isinstance(s, list) else [s]

    def plan(self, model: str) -> dict[str, list[SAEConfig]]:
        """hook -> the SAE configs to train on it, in params order (all groups merged)."""
        plan: dict[str, list[SAEConfig]] = {}
        if model not in self.sweep:
            return plan
        for group in self.groups(model):
            cfgs = [parse_sae_config(raw) for raw in group.saes]
            for hook in group.hooks:
                plan.setdefault(hook, []).extend(cfgs)
        return plan

    def folders(
        self, model: str, width: Callable[[str], int | None], pretrained: bool = True
    ) -> dict[str, list[str] | None]:
        """hook -> the folder names of the SAEs trained on it, and of the pretrained ones
        (None: they need the hook's width, which only the loaded model tells).
        `width(hook)`: the hook's width when params alone tell it."""
        out: dict[str, list[str] | None] = {}
        for hook, cfgs in self.plan(model).items():
            known = width(hook) is not None or all(c.name or c.d_sae for c in cfgs)
            out[hook] = [folder_name(c, width(hook)) for c in cfgs] if known else None
        for name, entry in (self.pretrained.get(model, {}) if pretrained else {}).items():
            names = out.setdefault(entry.hook, [])
            if names is not None:
                names.append(name)
        return out

    def check(self, p: Params) -> None:
        """Against `models` and `activations`: a sweep per model, on cached hooks, each
        entry valid for its architecture and its hook's width, folder names unique."""
        for name in p.models:
            if name not in self.sweep:
                raise KeyProblem(("saes", "sweep", name), MISSING,
                                f"expected the SAE sweep of model '{name}' ([] when it "
                                "only uses saes.pretrained)")  # fmt: skip
        for name in self.sweep:
            if name not in p.models:
                raise KeyProblem(("saes", "sweep", name), name, a_model(p.models))
            # SAE folder names (data/saes/<model>/<hook>/<name>/) must be unique per hook
            seen: dict[tuple[str, str], tuple] = {}
            for g, sweep in enumerate(self.groups(name)):
                loc = ("saes", "sweep", name) + ((g,) if isinstance(self.sweep[name], list) else ())
                cfgs = _check_group(p, name, sweep, loc)
                for i, cfg in enumerate(cfgs):
                    for hook in sweep.hooks:
                        folder = folder_name(cfg, p.hook_width(name, hook))
                        first = seen.setdefault((hook, folder), (*loc, "saes", i))
                        if first != (*loc, "saes", i):
                            raise KeyProblem(
                                (*loc, "saes", i), NO_VALUE,
                                f"expected a unique SAE name per hook, but {dotted(first)} "
                                f"also trains '{folder}' on {hook} (set `name` to tell them apart)",
                            )  # fmt: skip
        self._check_pretrained(p)

    def _check_pretrained(self, p: Params) -> None:
        """Each pretrained SAE: a known model, a cached hook, a folder name no trained SAE
        of that hook has, and (for `path`) a folder holding cfg.json."""
        for model, entries in self.pretrained.items():
            loc = ("saes", "pretrained", model)
            if model not in p.models:
                raise KeyProblem(loc, model, a_model(p.models))
            cached = p.activations.hooks.get(model, [])
            widths = functools.partial(p.hook_width, model)
            trained = {h: n or [] for h, n in self.folders(model, widths, pretrained=False).items()}
            for name, entry in entries.items():
                if why := why_unsafe(name):  # data/saes/<model>/<hook>/<name>/
                    raise KeyProblem((*loc, name), name, why)
                if entry.hook not in cached:
                    raise KeyProblem((*loc, name, "hook"), entry.hook,
                                    f"expected a cached hook of {model}: {cached} (the SAE "
                                    "is evaluated on, and its features read from, that hook)")  # fmt: skip
                if name in trained.get(entry.hook, []):
                    raise KeyProblem((*loc, name), name, f"expected a name no SAE of "
                                    f"saes.sweep.{model} trains on {entry.hook} (both would "
                                    f"write data/saes/{model}/{entry.hook}/{name}/)")  # fmt: skip
                if entry.path is not None and not (Path(entry.path) / "cfg.json").is_file():
                    raise KeyProblem((*loc, name, "path"), entry.path,
                                    "expected a SAELens-format folder holding cfg.json and "
                                    "sae_weights.safetensors (paths are relative to the "
                                    "repository root)")  # fmt: skip


def _as_written(x: float | None) -> float | int | None:
    """A float field's value as params.yaml most likely spelt it (16, not 16.0)."""
    return int(x) if x is not None and float(x).is_integer() else x


def folder_name(cfg: SAEConfig, d_in: int | None) -> str:
    """An SAE's folder name on a hook: `topk-1024-k8` once the width `d_in` is known."""
    return cfg.with_d_in(d_in).display_name if d_in is not None else cfg.display_name


def _check_group(p: Params, name: str, sweep: SAESweep, loc: tuple) -> list[SAEConfig]:
    """Every SAE entry of a group, validated; widths checked where the hook's is known."""
    cached = p.activations.hooks.get(name, [])
    if not sweep.hooks:
        raise KeyProblem((*loc, "hooks"), [], "expected at least one hook")
    for i, hook in enumerate(sweep.hooks):
        if hook not in cached:
            raise KeyProblem((*loc, "hooks", i), hook, f"expected one of the cached hooks {cached}")
        if hook in sweep.hooks[:i]:  # both would train into the same SAE folders
            first = sweep.hooks.index(hook)
            raise KeyProblem((*loc, "hooks", i), hook,
                            f"expected each hook once in a group (also {dotted((*loc, 'hooks', first))})")  # fmt: skip
    cfgs = []
    for i, raw in enumerate(sweep.saes):
        cfg = _sweep_entry(raw, (*loc, "saes", i))
        k = getattr(cfg, "k", None)  # TopK / BatchTopK: at most d_sae latents fire
        if k is not None and cfg.d_sae is not None and k > cfg.d_sae:
            raise KeyProblem((*loc, "saes", i, "k"), k, f"expected at most d_sae = {cfg.d_sae}")
        for hook in sweep.hooks:
            d = p.hook_width(name, hook)
            if d is None:
                continue  # known only once the model is loaded: checked by the stage
            if cfg.d_in is not None and cfg.d_in != d:
                raise KeyProblem((*loc, "saes", i, "d_in"), cfg.d_in,
                                f"expected the width of {hook}, {d} (or no d_in)")  # fmt: skip
            width = cfg.with_d_in(d).width
            if k is not None and k > width:
                how = "" if cfg.d_sae else (
                    f" (expansion_factor {cfg.expansion_factor:g} × {d}, the width of {hook})")  # fmt: skip
                raise KeyProblem((*loc, "saes", i, "k"), k,
                                f"expected at most d_sae = {width}{how}")  # fmt: skip
            t = _as_written(cfg.target_l0)
            if t is not None and t >= width:
                how = "" if cfg.d_sae else (
                    f" (expansion_factor {cfg.expansion_factor:g} × {d}, the width of {hook})")  # fmt: skip
                raise KeyProblem((*loc, "saes", i, "target_l0"), t,
                                f"expected less than d_sae = {width}{how}")  # fmt: skip
        cfgs.append(cfg)
    return cfgs


def _sweep_entry(raw: dict[str, Any], loc: tuple) -> SAEConfig:
    """One `saes.sweep` entry validated by its architecture's config class (strictly, like
    the rest of the file); errors name the entry's key."""
    archs = or_list([repr(a) for a in sorted(CONFIGS)])
    if "architecture" not in raw:
        raise KeyProblem((*loc, "architecture"), MISSING, f"expected {archs}")
    if raw["architecture"] not in CONFIGS:
        raise KeyProblem((*loc, "architecture"), raw["architecture"], f"expected {archs}")
    cls = CONFIGS[raw["architecture"]]
    try:
        return cls.model_validate(raw, strict=True)
    except ValidationError as err:
        raise Said(message(err.errors()[0], cls, raw, loc)) from None
