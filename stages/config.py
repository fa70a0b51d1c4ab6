"""The one typed schema for `params.yaml`.

Every stage calls `load_params()` before doing any work. A problem in the file stops
the stage with one line naming the key, the value and what was expected, e.g.

    params.yaml: models.toy-a.arch.d_model = -4, expected an integer ≥ 1

DVC makes each stage depend on its own keys only (see `dvc.yaml`); this schema checks
the whole file every time so a typo anywhere is caught before anything is written.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    Tag,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from stages.layout import SAFE_NAME_EXPECTED, is_inside, why_unsafe
from stages.params_messages import (
    MISSING,
    NO_VALUE,
    KeyProblem,
    Said,
    dotted,
    expected_for,
    key_value,
    message,
    or_list,
    walk,
)

PARAMS_FILE = Path("params.yaml")
# where JSONL steering sets live: the steering stage's DVC dependency (dvc.yaml)
PROMPTS_DIR = "data/prompts"


class ParamsError(ValueError):
    """A bad value in params.yaml; the message is one line naming key, value, expectation."""


class _Strict(BaseModel):
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

# ---------------------------------------------------------------------------- corpus


class ToyCorpus(_Strict):
    """The embedded story generator with planted concepts (stages/corpus.py)."""

    n_docs: PosInt = 8000
    seed: Seed = 0


class HFCorpus(_Strict):
    """Any HF `datasets` source: a hub dataset id (streamed) or a builder over local files."""

    path: str = Field(description="'text', 'json', 'parquet' or a hub dataset id")
    data_files: list[str] = []
    name: str | None = None
    split: str = "train"
    text_field: str = "text"
    streaming: bool = False
    max_docs: PosInt | None = None


class CorpusParams(_Strict):
    source: Literal["toy", "hf"] = "toy"
    heldout_fraction: Fraction = 0.05
    toy: ToyCorpus = ToyCorpus()
    hf: HFCorpus | None = None

    @model_validator(mode="after")
    def _source_has_section(self) -> CorpusParams:
        if self.source == "hf" and self.hf is None:
            raise KeyProblem(("hf",), MISSING, "expected an hf section when source is 'hf'")
        return self


# ---------------------------------------------------------------------------- models

# TransformerLens hook names of a standard decoder block that the activations stage can
# cache: one vector per token. Checked here so a typo fails before any work; the stage
# re-checks against the loaded model's hook_dict.
_BLOCK_HOOKS = {
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
    "ln1.hook_scale",
    "ln1.hook_normalized",
    "ln2.hook_scale",
    "ln2.hook_normalized",
    "mlp.hook_pre",
    "mlp.hook_post",
}
# Hooks of a block that exist but cannot be cached, and why (the first two reasons are the
# activations stage's own, `stages/activations.py` `_hook_width`).
_PER_HEAD = "it has per-head shape; cache a residual / MLP / attention output hook"
_PATTERN = "it is an attention pattern, not a per-token activation"
_UNCACHEABLE = {
    **dict.fromkeys(("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z",
                     "attn.hook_result"), _PER_HEAD),
    **dict.fromkeys(("attn.hook_attn_scores", "attn.hook_pattern"), _PATTERN),
    # TransformerLens calls these only when the model config asks for them (use_attn_in,
    # use_split_qkv_input, use_hook_mlp_in); the models here do not, so they never fire
    **dict.fromkeys(("hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input"),
                    "TransformerLens calls it only with use_attn_in / use_split_qkv_input, "
                    "which the models here do not set (and it has per-head shape)"),
    "hook_mlp_in": "TransformerLens calls it only with use_hook_mlp_in, which the models "
    "here do not set; cache hook_resid_mid (the same values)",
}  # fmt: skip
_GLOBAL_HOOKS = {"hook_embed", "hook_pos_embed", "ln_final.hook_scale", "ln_final.hook_normalized"}
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def hook_layer(hook: str) -> int | None:
    """Block index of a TransformerLens hook name (None for embed / final-LN hooks)."""
    m = _HOOK_RE.match(hook)
    return int(m.group(1)) if m else None


def check_hook_name(hook: str, n_layers: int | None) -> str | None:
    """Return why `hook` is not a valid hook name for a model with n_layers, or None."""
    if hook in _GLOBAL_HOOKS:
        return None
    m = _HOOK_RE.match(hook)
    if m and m.group(2) in _UNCACHEABLE:
        return f"expected a hook with one vector per token: {_UNCACHEABLE[m.group(2)]}"
    if not m or m.group(2) not in _BLOCK_HOOKS:
        return "expected a TransformerLens hook name such as 'blocks.1.hook_resid_post'"
    if n_layers is not None and int(m.group(1)) >= n_layers:
        return f"expected a block index < n_layers = {n_layers}"
    return None


class ToyArch(_Strict):
    n_layers: PosInt = 2
    d_model: PosInt = 128
    n_heads: PosInt = 4
    d_mlp: PosInt = 512
    n_ctx: PosInt = 128
    act_fn: Literal["gelu", "relu", "gelu_new", "silu"] = "gelu"

    @model_validator(mode="after")
    def _heads_divide(self) -> ToyArch:
        if self.d_model % self.n_heads:
            raise KeyProblem(("n_heads",), self.n_heads,
                            f"expected a divisor of d_model = {self.d_model}")  # fmt: skip
        return self


class ToyTokenizer(_Strict):
    vocab_size: Annotated[int, Field(ge=260)] = 1024


class ToyTrain(_Strict):
    tokens: PosInt = 600_000
    batch_size: PosInt = 32
    seq_len: PosInt = 128
    lr: PosFloat = 3e-3
    warmup_steps: NonNegInt = 30
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    eval_tokens: PosInt = 32_768


class ToyModel(_Strict):
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


class PretrainedModel(_Strict):
    """A TransformerLens model loaded by name; needs the HF hub or a filled HF cache."""

    source: Literal["pretrained"]
    name: str
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"

    @property
    def n_layers(self) -> int | None:
        return None  # known only once the config is loaded


ModelParams = Annotated[ToyModel | PretrainedModel, Field(discriminator="source")]

# ---------------------------------------------------------------------------- activations


class StoreParams(_Strict):
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


class ActivationParams(_Strict):
    """`store`: how every cache is written; `hooks`: per model, which hook points."""

    store: StoreParams = StoreParams()
    hooks: dict[str, list[str]]


# ---------------------------------------------------------------------------- saes


class SAEEval(_Strict):
    """Evaluation, always on the held-out split."""

    max_rows: PosInt | None = 65_536  # rows for reconstruction metrics and ground truth
    ce_windows: PosInt = 64  # windows for CE loss recovered / KL with the SAE spliced in


class SAESweep(_Strict):
    """A group of a model's sweep: cached hooks x SAEs (each SAE is trained on every hook).

    Each SAE entry is one flat mapping validated by its architecture's config class in
    `stages/sae/` (`architecture`, `name`, `expansion_factor` or `d_sae`, `k`, ...).
    """

    hooks: list[str]
    saes: list[dict[str, Any]]


# One {hooks, saes} group or a list of them, told apart by the value's type (a tagged
# union: errors name the group, not every member pydantic tried).
SweepGroups = Annotated[
    Union[Annotated[SAESweep, Tag("group")], Annotated[list[SAESweep], Tag("groups")]],  # noqa: UP007
    Discriminator(lambda v: "groups" if isinstance(v, list) else "group"),
]


class SAEParams(_Strict):
    eval: SAEEval = SAEEval()
    checkpoint_every: PosInt = 200  # optimizer steps between resumable checkpoints
    # per model: one {hooks, saes} group, or a list of groups (e.g. the full architecture
    # sweep on one hook and a single SAE on every other hook)
    sweep: dict[str, SweepGroups]

    def groups(self, model: str) -> list[SAESweep]:
        s = self.sweep[model]
        return s if isinstance(s, list) else [s]


# ---------------------------------------------------------------------------- steering

TOY_STEERING_SETS = ("emotion_polarity", "mammal_vs_bird", "past_vs_present")


class ToySteeringSets(_Strict):
    """Contrastive sets generated from the embedded corpus's grammar."""

    seed: Seed = 0
    n_train: PosInt = 64  # training pairs per set (the vector is built from these)
    n_heldout: PosInt = 32  # held-out pairs / eval prompts per set


class SteeringConfig(_Strict):
    """Shared knobs of the per-concept analysis (`stages.steering.ConceptConfig`)."""

    method: Literal["mean_diff", "pca"] = "mean_diff"
    multipliers: list[float] = [-8.0, -6.0, -4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0, 6.0, 8.0]
    positions: Literal["last", "all"] = "last"  # where eval prompts are steered
    side_positions: Literal["last", "all"] = "all"  # where neutral text is steered (KL, CE)
    kl_multiplier: PosFloat = 4.0  # side effects measured at this multiplier
    kl_budget: PosFloat = 0.5  # nats/token: the layer sweep picks the best layer within it
    n_windows: PosInt = 32  # held-out corpus windows for side effects and downstream effects
    batch_size: PosInt = 64
    max_features: PosInt = 32  # non-negative OMP steps (the error curve's length)
    targeted_k: PosInt = 5  # features kept by the feature-targeted vector
    gt_f1_threshold: Fraction = 0.3  # a latent is a concept's ground truth above this F1
    n_generations: NonNegInt = 3
    max_new_tokens: PosInt = 10
    generation_multiplier: PosFloat = 4.0
    seed: Seed = 0

    @model_validator(mode="after")
    def _symmetric(self) -> SteeringConfig:
        m = sorted(self.multipliers)
        if len(set(m)) < 2:  # [0, 0, 0]: no slope to fit
            raise KeyProblem(("multipliers",), self.multipliers, "expected at least two "
                            "distinct finite values (steerability is a slope over them)")  # fmt: skip
        if len(m) < 3 or m != sorted(-x for x in m) or 0.0 not in m:
            raise KeyProblem(("multipliers",), self.multipliers, "expected a symmetric range "
                            "around 0 that includes 0 (steerability is a slope over it)")  # fmt: skip
        return self


class ModelSteering(_Strict):
    """Per model: the sets to build vectors for, the hooks to sweep, the SAE per hook."""

    # a name from the generated toy sets, or a JSONL file (data/prompts/README.md)
    sets: list[str]
    hooks: list[str]  # steering layers: vectors at each, the layer sweep picks one
    # hook -> SAE folder name under data/saes/<model>/<hook>/: decomposition at the chosen
    # hook, downstream effects at every later one
    saes: dict[str, str] = {}


class SteeringParams(_Strict):
    toy_sets: ToySteeringSets = ToySteeringSets()
    config: SteeringConfig = SteeringConfig()
    models: dict[str, ModelSteering]


# ---------------------------------------------------------------------------- align


class AlignPair(_Strict):
    a: str
    b: str


class SteeringTransfer(_Strict):
    """Carry A's steering vectors to B through the Hungarian feature matches."""

    method: Literal["nnls", "encode"] = "nnls"  # A's vector -> A's feature coefficients
    k: PosInt | None = None  # keep only the top-k features (None: all)
    # drop matches whose activation correlation (the match score) is below this
    min_correlation: Annotated[float, Field(ge=-1, le=1)] | None = None
    # the null: random directions of B's own vector's norm (p-value floor 1 / (n + 1))
    n_random: Annotated[int, Field(ge=2)] = 32


class AlignParams(_Strict):
    # name "<A>__<B>" -> the pair; output data/alignment/<A>__<B>/
    pairs: dict[str, AlignPair]
    # `stages.alignment.AlignConfig` fields (hook_pairs, sae_names, max_tokens, threshold,
    # n_null, n_permutations, n_samples, knn_k, seed, ...)
    config: dict[str, Any] = {}
    transfer: SteeringTransfer = SteeringTransfer()


# ---------------------------------------------------------------------------- report


class ReportDashboards(_Strict):
    """Feature dashboards (`stages.report.DashboardConfig`)."""

    n_most_active: NonNegInt = 12  # latents per SAE picked by density
    concept_features: bool = True  # plus each concept's best latent
    n_contexts: PosInt = 12  # top-activating contexts per page
    n_quantiles: PosInt = 4  # activation-quantile intervals with samples
    max_rows: PosInt | None = 200_000  # held-out rows streamed per SAE (None: all)


class ReportParams(_Strict):
    # SAEs to build dashboards for ("model/hook/sae" or SAE names); None: one TopK per
    # (model, hook) plus every SAE the steering and align stages used
    dashboard_saes: list[str] | None = None
    dashboards: ReportDashboards = ReportDashboards()


# ---------------------------------------------------------------------------- compute


class DaskParams(_Strict):
    """A Dask cluster for the Prefect tasks (`prefect-dask`'s DaskTaskRunner)."""

    address: str | None = None  # an existing scheduler (tcp://host:8786); null: a local cluster
    n_workers: PosInt = 2  # local cluster size; also how many parts work is split into
    threads_per_worker: PosInt = 1


class ComputeParams(_Strict):
    """Where the stages run (`stages/compute.py`). `runner` and `device` are not DVC
    dependencies: the runner does not change what is computed (the local and Dask paths
    write the same bytes; a test checks it), the device only the last bits. `precision`
    is a dependency of the stages whose numbers it changes (dvc.yaml)."""

    runner: Literal["local", "dask"] = "local"
    dask: DaskParams = DaskParams()
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["fp32", "bf16"] = "fp32"

    @field_validator("device")
    @classmethod
    def _device_spelling(cls, v: str) -> str:
        from stages.compute import DEVICE_RE

        if not DEVICE_RE.match(v):
            raise ValueError("expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return v

    def with_env(self) -> ComputeParams:
        """Environment overrides, for one run without editing params.yaml:
        ATLAS_RUNNER, ATLAS_DASK_ADDRESS, ATLAS_DASK_WORKERS, ATLAS_DEVICE."""
        import os

        upd: dict[str, Any] = {}
        dask: dict[str, Any] = {}
        env = {"runner": "ATLAS_RUNNER", "device": "ATLAS_DEVICE",
               "address": "ATLAS_DASK_ADDRESS", "n_workers": "ATLAS_DASK_WORKERS"}  # fmt: skip
        for key, var in env.items():
            if v := os.environ.get(var):
                if key == "n_workers" and v.strip().isdigit():
                    v = int(v)  # type: ignore[assignment]  # strict: "3" is not an integer
                (dask if key in ("address", "n_workers") else upd)[key] = v
        if not upd and not dask:
            return self
        raw = self.model_dump()
        raw.update(upd)
        raw["dask"].update(dask)
        try:
            return ComputeParams.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            var = env[str(err["loc"][-1])]
            _, tp, metas, _ = walk(ComputeParams, err["loc"])
            raise ParamsError(f"environment: {var} = {os.environ[var]!r}, "
                              f"{expected_for(err, tp, metas)}") from None  # fmt: skip


# ---------------------------------------------------------------------------- root


class Params(_Strict):
    corpus: CorpusParams = CorpusParams()
    models: dict[str, ModelParams]
    activations: ActivationParams
    saes: SAEParams | None = None
    steering: SteeringParams | None = None
    align: AlignParams | None = None
    report: ReportParams = ReportParams()
    compute: ComputeParams = ComputeParams()

    @model_validator(mode="after")
    def _models_consistent(self) -> Params:
        if not self.models:
            raise KeyProblem(("models",), self.models, "expected at least one model")
        for name, m in self.models.items():
            if why := why_unsafe(name):  # data/models/<name>/, data/activations/<name>/, ...
                raise KeyProblem(("models", name), name, why)
            hooks = self.activations.hooks.get(name)
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
            if isinstance(m, ToyModel) and self.activations.store.seq_len > m.arch.n_ctx:
                raise KeyProblem(
                    ("activations", "store", "seq_len"),
                    self.activations.store.seq_len,
                    f"expected an integer ≤ models.{name}.arch.n_ctx = {m.arch.n_ctx}",
                )
        for name in self.activations.hooks:
            if name not in self.models:
                raise KeyProblem(("activations", "hooks", name), name, self._a_model())
        if self.saes is not None:
            self._check_saes(self.saes)
        if self.steering is not None:
            self._check_steering(self.steering)
        if self.align is not None:
            self._check_align(self.align)
        if self.report.dashboard_saes is not None:
            self._check_dashboards(self.report.dashboard_saes)
        return self

    def _a_model(self) -> str:
        return f"expected a model listed under models ({', '.join(self.models)})"

    def _check_saes(self, saes: SAEParams) -> None:
        for name in self.models:
            if name not in saes.sweep:
                raise KeyProblem(("saes", "sweep", name), MISSING,
                                f"expected the SAE sweep of model '{name}'")  # fmt: skip
        for name in saes.sweep:
            if name not in self.models:
                raise KeyProblem(("saes", "sweep", name), name, self._a_model())
            # SAE folder names (data/saes/<model>/<hook>/<name>/) must be unique per hook
            seen: dict[tuple[str, str], tuple] = {}
            for g, sweep in enumerate(saes.groups(name)):
                loc = ("saes", "sweep", name) + ((g,) if isinstance(saes.sweep[name], list) else ())
                cfgs = self._check_sae_group(name, sweep, loc)
                for i, cfg in enumerate(cfgs):
                    for hook in sweep.hooks:
                        folder = self._folder(cfg, name, hook)
                        first = seen.setdefault((hook, folder), (*loc, "saes", i))
                        if first != (*loc, "saes", i):
                            raise KeyProblem(
                                (*loc, "saes", i), NO_VALUE,
                                f"expected a unique SAE name per hook, but {dotted(first)} "
                                f"also trains '{folder}' on {hook} (set `name` to tell them apart)",
                            )  # fmt: skip

    def _check_sae_group(self, name: str, sweep: SAESweep, loc: tuple) -> list:
        """Every SAE entry of a group, validated; widths checked where the hook's is known."""
        cached = self.activations.hooks.get(name, [])
        if not sweep.hooks:
            raise KeyProblem((*loc, "hooks"), [], "expected at least one hook")
        for i, hook in enumerate(sweep.hooks):
            if hook not in cached:
                raise KeyProblem(
                    (*loc, "hooks", i), hook, f"expected one of the cached hooks {cached}"
                )
            if hook in sweep.hooks[:i]:  # both would train into the same SAE folders
                first = sweep.hooks.index(hook)
                raise KeyProblem((*loc, "hooks", i), hook,
                                f"expected each hook once in a group (also {dotted((*loc, 'hooks', first))})")  # fmt: skip
        cfgs = []
        for i, raw in enumerate(sweep.saes):
            cfg = _sae_config(raw, (*loc, "saes", i))
            k = getattr(cfg, "k", None)  # TopK / BatchTopK: at most d_sae latents fire
            if k is not None and cfg.d_sae is not None and k > cfg.d_sae:
                raise KeyProblem((*loc, "saes", i, "k"), k, f"expected at most d_sae = {cfg.d_sae}")
            for hook in sweep.hooks:
                d = self.hook_width(name, hook)
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
            cfgs.append(cfg)
        return cfgs

    def _check_steering(self, st: SteeringParams) -> None:
        for name, ms in st.models.items():
            loc = ("steering", "models", name)
            if name not in self.models:
                raise KeyProblem(loc, name, self._a_model())
            if not ms.sets:
                raise KeyProblem((*loc, "sets"), [], "expected at least one contrastive set")
            for i, s in enumerate(ms.sets):
                if s not in TOY_STEERING_SETS and not s.endswith(".jsonl"):
                    raise KeyProblem((*loc, "sets", i), s, "expected one of the generated sets "
                                    f"{list(TOY_STEERING_SETS)} or a .jsonl file")  # fmt: skip
                # Only that the file is there: parsing it here (stages.steering.prompts)
                # would import torch, scipy and pyarrow into every stage's params check.
                # The steering stage's DVC dependency is data/prompts/ (dvc.yaml): a set
                # elsewhere would go stale unseen (`dvc status` would not see it change).
                if s.endswith(".jsonl") and not is_inside(PROMPTS_DIR, s):
                    raise KeyProblem((*loc, "sets", i), s, f"expected a JSONL file under "
                                    f"{PROMPTS_DIR}/, the steering stage's DVC dependency "
                                    "(copy it there, so that `dvc status` sees it change)")  # fmt: skip
                if s.endswith(".jsonl") and not Path(s).is_file():
                    raise KeyProblem((*loc, "sets", i), s, "expected an existing JSONL file "
                                    "(no such file; paths are relative to the repository root)")  # fmt: skip
                if s in ms.sets[:i]:
                    raise KeyProblem((*loc, "sets", i), s, "expected each set once")
            if not ms.hooks:
                raise KeyProblem((*loc, "hooks"), [], "expected at least one hook")
            cached = self.activations.hooks.get(name, [])
            for i, hook in enumerate(ms.hooks):
                why = check_hook_name(hook, self.models[name].n_layers)
                if why:
                    raise KeyProblem((*loc, "hooks", i), hook, why)
            folders = self.sae_folders(name)
            for hook, sae in ms.saes.items():
                if hook not in cached:
                    raise KeyProblem((*loc, "saes", hook), sae,
                                    f"expected a cached hook of {name}: {cached}")  # fmt: skip
                if why := why_unsafe(sae):  # data/saes/<model>/<hook>/<sae>/
                    raise KeyProblem((*loc, "saes", hook), sae, why)
                names = folders.get(hook, [])
                if names is None:
                    continue  # known only once the model is loaded: checked by the stage
                if sae not in names:
                    raise KeyProblem((*loc, "saes", hook), sae,
                                    f"expected an SAE trained on that hook by saes.sweep.{name}: {names}")  # fmt: skip

    def _check_align(self, al: AlignParams) -> None:
        for key, pair in al.pairs.items():
            loc = ("align", "pairs", key)
            for side in ("a", "b"):
                m = getattr(pair, side)
                if m not in self.models:
                    raise KeyProblem((*loc, side), m, self._a_model())
            if pair.a == pair.b:
                raise KeyProblem((*loc, "b"), pair.b, f"expected a model other than a = '{pair.a}'")
            if key != f"{pair.a}__{pair.b}":
                raise KeyProblem(loc, key, f"expected the pair's name '{pair.a}__{pair.b}' "
                                "(it names the output folder data/alignment/<A>__<B>)")  # fmt: skip
        cfg = _align_config(al.config)
        for key, pair in al.pairs.items():
            self._check_align_pair(key, pair, cfg)

    def _check_align_pair(self, key: str, pair: AlignPair, cfg: Any) -> None:
        """The hooks and SAE names of `align.config`, as the align stage will read them."""
        hooks_a, hooks_b = self.hooks(pair.a), self.hooks(pair.b)
        if cfg.hook_pairs is None:
            hook_pairs = [(h, h) for h in hooks_a if h in hooks_b]
            if not hook_pairs:
                raise KeyProblem(("align", "pairs", key), NO_VALUE,
                                f"expected models that cache a hook in common ({pair.a}: "
                                f"{hooks_a}; {pair.b}: {hooks_b}), or align.config.hook_pairs")  # fmt: skip
        else:
            hook_pairs = list(cfg.hook_pairs)
            for j, hp in enumerate(hook_pairs):
                for side, (m, h, hooks) in enumerate(((pair.a, hp[0], hooks_a),
                                                      (pair.b, hp[1], hooks_b))):  # fmt: skip
                    if h not in hooks:
                        raise KeyProblem(("align", "config", "hook_pairs", j, side), h,
                                        f"expected a hook cached by {m}: {hooks}")  # fmt: skip
        if cfg.sae_names is None or cfg.sae_names == "all":
            return
        if isinstance(cfg.sae_names, str):
            raise KeyProblem(("align", "config", "sae_names"), cfg.sae_names,
                            "expected a list of SAE names, 'all' or null")  # fmt: skip
        # A name neither model trains is a typo. (The stage also wants each name on every
        # compared hook either model has SAEs on; that is left to it: a run of one stage
        # may leave the align keys behind the sweep it changed.)
        for j, n in enumerate(cfg.sae_names):
            if why := why_unsafe(n):  # SAE folder names
                raise KeyProblem(("align", "config", "sae_names", j), n, why)
        folders = [self.sae_folders(m) for m in (pair.a, pair.b)]
        if any(names is None for f in folders for names in f.values()):
            return  # known only once the model is loaded: checked by the stage
        known = sorted({n for f in folders for names in f.values() for n in names or []})
        for j, n in enumerate(cfg.sae_names):
            if n not in known:
                raise KeyProblem(("align", "config", "sae_names", j), n,
                                f"expected an SAE name of saes.sweep.{pair.a} or "
                                f"saes.sweep.{pair.b} (align.pairs.{key}): {known}")  # fmt: skip

    def _check_dashboards(self, wanted: list[str]) -> None:
        """`report.dashboard_saes`: each an SAE name or 'model/hook/name' (the report's
        `_pick` rule), where params tell the folder names."""
        keys: set[str] = set()
        unknown: set[str] = set()  # models whose SAE folder names need the loaded model
        for model in self.models:
            for hook, names in self.sae_folders(model).items():
                if names is None:
                    unknown.add(model)
                    continue
                keys.update(f"{model}/{hook}/{n}" for n in names)
        names = sorted({k.rsplit("/", 1)[1] for k in keys})
        for i, w in enumerate(wanted):
            if w in keys or w in names:
                continue
            parts = w.split("/")
            if len(parts) not in (1, 3) or any(why_unsafe(p) for p in parts):
                raise KeyProblem(("report", "dashboard_saes", i), w, "expected an SAE name or "
                                f"'model/hook/name', each part a folder name ({SAFE_NAME_EXPECTED})")  # fmt: skip
            if w.split("/")[0] in unknown if "/" in w else unknown:
                continue  # known only once the model is loaded: checked by the stage
            raise KeyProblem(("report", "dashboard_saes", i), w,
                            f"expected an SAE of saes.sweep, by name ({', '.join(names) or 'none'}) "
                            "or as 'model/hook/name'")  # fmt: skip

    def hook_width(self, model: str, hook: str) -> int | None:
        """Width of a hook's activations when params alone tell it (toy models), else None.
        The same rule as the activations stage's (`stages/activations.py` `_hook_width`)."""
        m = self.models[model]
        if not isinstance(m, ToyModel) or check_hook_name(hook, m.n_layers):
            return None
        if hook.endswith(("mlp.hook_pre", "mlp.hook_post")):
            return m.arch.d_mlp
        if hook.endswith("hook_scale"):
            return 1
        return m.arch.d_model

    def _folder(self, cfg: Any, model: str, hook: str) -> str:
        """An SAE's folder name on a hook: `topk-1024-k8` once the width is known."""
        d = self.hook_width(model, hook)
        return cfg.with_d_in(d).display_name if d is not None else cfg.display_name

    def sae_folders(self, model: str) -> dict[str, list[str] | None]:
        """hook -> the folder names of the SAEs trained on it (None: they need the hook's
        width, which only the loaded model tells)."""
        out: dict[str, list[str] | None] = {}
        for hook, cfgs in self.sae_plan(model).items():
            known = self.hook_width(model, hook) is not None or all(c.name or c.d_sae for c in cfgs)
            out[hook] = [self._folder(c, model, hook) for c in cfgs] if known else None
        return out

    def sae_plan(self, model: str) -> dict[str, list]:
        """hook -> the SAE configs to train on it, in params order (all groups merged)."""
        from stages.sae.config import parse_sae_config

        plan: dict[str, list] = {}
        if self.saes is None or model not in self.saes.sweep:
            return plan
        for group in self.saes.groups(model):
            cfgs = [parse_sae_config(raw) for raw in group.saes]
            for hook in group.hooks:
                plan.setdefault(hook, []).extend(cfgs)
        return plan

    def hooks(self, model: str) -> list[str]:
        return self.activations.hooks[model]


def _sae_config(raw: dict[str, Any], loc: tuple) -> Any:
    """One `saes.sweep` entry validated by its architecture's config class (strictly, like
    the rest of the file); errors name the entry's key."""
    from stages.sae.config import CONFIGS

    archs = or_list([repr(a) for a in sorted(CONFIGS)])
    if "architecture" not in raw:
        raise KeyProblem((*loc, "architecture"), MISSING, f"expected {archs}")
    if raw["architecture"] not in CONFIGS:
        raise KeyProblem((*loc, "architecture"), raw["architecture"], f"expected {archs}")
    cls = CONFIGS[raw["architecture"]]
    try:
        return cls.model_validate(raw, strict=True)
    except ValidationError as err:
        e = err.errors()[0]
        why = str((e.get("ctx") or {}).get("error", ""))
        if m := re.search(r"k = (\S+) exceeds d_sae = (\d+)$", why):  # TopKConfig's check
            raise KeyProblem(
                (*loc, "k"), raw.get("k"), f"expected at most d_sae = {m[2]}"
            ) from None
        raise Said(message(e, cls, raw, loc)) from None


@functools.cache
def _align_schema() -> type[BaseModel]:
    """`stages.alignment.config.AlignConfig`'s fields as a strict pydantic model: the
    dataclass stays the one place they are declared; this checks their types."""
    from stages.alignment.config import AlignConfig

    hints = get_type_hints(AlignConfig)
    fields: dict[str, Any] = {f.name: (_strict_scalars(hints[f.name]), f.default)
                              for f in dataclasses.fields(AlignConfig)}  # fmt: skip
    # a match "has a partner" when its correlation is >= threshold: a correlation
    fields["threshold"] = (Annotated[float, Strict(), Field(ge=-1, le=1)], fields["threshold"][1])
    return create_model("AlignConfig", __config__=ConfigDict(extra="forbid"), **fields)


def _align_config(raw: dict[str, Any]) -> Any:
    from stages.alignment.config import AlignConfig

    schema = _align_schema()
    try:
        schema.model_validate(raw)
    except ValidationError as err:
        raise Said(message(err.errors()[0], schema, raw, ("align", "config"))) from None
    try:
        return AlignConfig.from_params(raw)
    except ValueError as e:  # its own range checks: "align: max_tokens = 1, expected ..."
        msg = str(e).removeprefix("align: ").replace(">=", "≥")
        raise Said(f"align.config.{msg}") from None


def _strict_scalars(tp: Any) -> Any:
    """`tp` with every int / float / bool / str strict (containers stay lax: a YAML list
    is a valid tuple)."""
    if tp in (int, float, bool, str):
        return Annotated[tp, Strict()]
    origin, args = get_origin(tp), get_args(tp)
    if not args or origin is Literal:
        return tp
    if origin is Annotated:
        return Annotated[(_strict_scalars(args[0]), *tp.__metadata__)]
    new = tuple(a if a is ... else _strict_scalars(a) for a in args)
    if origin in (Union, types.UnionType):
        return Union[new]  # noqa: UP007
    return origin[new]


def _format_pydantic(err: ValidationError, origin: str, raw: Any = None) -> str:
    return f"{origin}: {message(err.errors()[0], Params, raw)}"


# ---------------------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; a model listed twice must fail.

    Merge keys (`<<: *defaults`, or a list of anchors) work as in DVC's YAML reader: the
    merged keys come first and the mapping's own keys override them."""


_MERGE = "tag:yaml.org,2002:merge"


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == _MERGE:  # `<<: *anchor`: its keys are defaults, not repeats
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ParamsError(
                f"line {key_node.start_mark.line + 1}: key '{key}' appears twice "
                f"(first on line {seen[key]}), expected each key once"
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
# PyYAML follows YAML 1.1, which reads `lr: 1e-3` (no dot) as the string '1e-3'; YAML 1.2,
# DVC and every reader of the file mean a number.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_params(raw: Any, origin: str = "params.yaml") -> Params:
    """Validate an already-loaded mapping; raise ParamsError with a one-line message."""
    if not isinstance(raw, dict):
        raise ParamsError(
            f"{origin}: expected a mapping at the top level, got {type(raw).__name__}"
        )
    if bad := _non_finite(raw):
        loc, value = bad
        raise ParamsError(f"{origin}: {key_value(dotted(loc), value, 'expected a finite number')}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format_pydantic(err, origin, raw)) from None


def _non_finite(raw: Any, loc: tuple = ()) -> tuple[tuple, float] | None:
    """The first NaN / inf anywhere in the file (YAML's .inf, .nan), with its key: no
    knob means anything at infinity, and a NaN compares false with every bound."""
    if isinstance(raw, float) and not math.isfinite(raw):
        return loc, raw
    items = (
        raw.items() if isinstance(raw, dict) else enumerate(raw) if isinstance(raw, list) else ()
    )
    for k, v in items:
        if bad := _non_finite(v, (*loc, k)):
            return bad
    return None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml (or `path`). Raises ParamsError on any problem."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: file not found, expected the pipeline's params file")
    if path.is_dir():
        raise ParamsError(f"{path}: is a directory, expected the pipeline's params file "
                          "(a YAML file)")  # fmt: skip
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (safe loader)
    except UnicodeDecodeError as e:
        raise ParamsError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                          f"{e.start}), expected a YAML file") from None  # fmt: skip
    except OSError as e:
        raise ParamsError(f"{path}: cannot be read ({e.strerror or e})") from None
    except ParamsError as e:
        raise ParamsError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ParamsError(f"{path}:{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    return parse_params(raw, str(path))


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested params into dotted keys (MLflow params, provenance)."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, list) and obj and any(isinstance(v, dict | list | BaseModel) for v in obj):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix.rstrip(".")] = obj
    return out
