"""The one typed schema for `params.yaml`.

Every stage calls `load_params()` before doing any work. A problem in the file stops
the stage with one line naming the key, the value and what was expected, e.g.

    params.yaml: models.toy-a.arch.d_model = -4, expected an integer >= 1

DVC makes each stage depend on its own keys only (see `dvc.yaml`); this schema checks
the whole file every time so a typo anywhere is caught before anything is written.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PARAMS_FILE = Path("params.yaml")


class ParamsError(ValueError):
    """A bad value in params.yaml; the message is one line naming key, value, expectation."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(gt=0, lt=1)]

# ---------------------------------------------------------------------------- corpus


class ToyCorpus(_Strict):
    """The embedded story generator with planted concepts (stages/corpus.py)."""

    n_docs: PosInt = 8000
    seed: int = 0


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
            raise ValueError("corpus.source is 'hf' but there is no corpus.hf section")
        return self


# ---------------------------------------------------------------------------- models

# TransformerLens hook names of a standard decoder block. Checked here so a typo fails
# before any work; the activation stage re-checks against the loaded model's hook_dict.
_BLOCK_HOOKS = {
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
    "hook_attn_in",
    "hook_q_input",
    "hook_k_input",
    "hook_v_input",
    "hook_mlp_in",
    "ln1.hook_scale",
    "ln1.hook_normalized",
    "ln2.hook_scale",
    "ln2.hook_normalized",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_z",
    "attn.hook_attn_scores",
    "attn.hook_pattern",
    "attn.hook_result",
    "mlp.hook_pre",
    "mlp.hook_post",
}
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
            raise ValueError(f"n_heads = {self.n_heads} must divide d_model = {self.d_model}")
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
    seed: int = 0
    arch: ToyArch = ToyArch()
    tokenizer: ToyTokenizer = ToyTokenizer()
    train: ToyTrain = ToyTrain()

    @property
    def n_layers(self) -> int | None:
        return self.arch.n_layers

    @model_validator(mode="after")
    def _seq_fits(self) -> ToyModel:
        if self.train.seq_len > self.arch.n_ctx:
            raise ValueError(
                f"train.seq_len = {self.train.seq_len} exceeds arch.n_ctx = {self.arch.n_ctx}"
            )
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
            raise ValueError(
                f"chunk_rows = {self.chunk_rows} must divide shard_rows = {self.shard_rows}"
            )
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


class SAEParams(_Strict):
    eval: SAEEval = SAEEval()
    checkpoint_every: PosInt = 200  # optimizer steps between resumable checkpoints
    # per model: one {hooks, saes} group, or a list of groups (e.g. the full architecture
    # sweep on one hook and a single SAE on every other hook)
    sweep: dict[str, SAESweep | list[SAESweep]]

    def groups(self, model: str) -> list[SAESweep]:
        s = self.sweep[model]
        return s if isinstance(s, list) else [s]


# ---------------------------------------------------------------------------- steering

TOY_STEERING_SETS = ("emotion_polarity", "mammal_vs_bird", "past_vs_present")


class ToySteeringSets(_Strict):
    """Contrastive sets generated from the embedded corpus's grammar."""

    seed: int = 0
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
    seed: int = 0

    @model_validator(mode="after")
    def _symmetric(self) -> SteeringConfig:
        m = sorted(self.multipliers)
        if len(m) < 3 or m != sorted(-x for x in m) or 0.0 not in m:
            raise ValueError(
                f"steering.config.multipliers = {self.multipliers}: expected a symmetric "
                "range around 0 that includes 0 (steerability is a slope over it)"
            )
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
    min_correlation: float | None = None  # drop matches below this correlation
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


# ---------------------------------------------------------------------------- root


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
            raise ValueError(f"{v!r} is not a device: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return v

    def with_env(self) -> ComputeParams:
        """Environment overrides, for one run without editing params.yaml:
        ATLAS_RUNNER, ATLAS_DASK_ADDRESS, ATLAS_DASK_WORKERS, ATLAS_DEVICE."""
        import os

        upd: dict[str, Any] = {}
        dask: dict[str, Any] = {}
        for var, key, target in (("ATLAS_RUNNER", "runner", upd),
                                 ("ATLAS_DEVICE", "device", upd),
                                 ("ATLAS_DASK_ADDRESS", "address", dask),
                                 ("ATLAS_DASK_WORKERS", "n_workers", dask)):  # fmt: skip
            if os.environ.get(var):
                target[key] = os.environ[var]
        if not upd and not dask:
            return self
        raw = self.model_dump()
        raw.update(upd)
        raw["dask"].update(dask)
        try:
            return ComputeParams.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            var = {"runner": "ATLAS_RUNNER", "device": "ATLAS_DEVICE", "address":
                   "ATLAS_DASK_ADDRESS", "n_workers": "ATLAS_DASK_WORKERS"}[str(err["loc"][-1])]  # fmt: skip
            raise ParamsError(f"environment: {var} = {os.environ[var]!r}: {err['msg']}") from None


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
            raise ValueError("models: expected at least one model")
        for name, m in self.models.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
                raise _KeyError(
                    ("models", name),
                    name,
                    "expected a name of letters, digits, '-', '_' or '.' (it becomes a path)",
                )
            hooks = self.activations.hooks.get(name)
            loc = ("activations", "hooks", name)
            if hooks is None:
                raise _KeyError(loc, None, f"expected a list of hooks for model '{name}'")
            if not hooks:
                raise _KeyError(loc, [], "expected at least one hook")
            if len(set(hooks)) != len(hooks):
                raise _KeyError(loc, hooks, "expected no repeated hook")
            for i, hook in enumerate(hooks):
                why = check_hook_name(hook, m.n_layers)
                if why:
                    raise _KeyError((*loc, i), hook, why)
            if isinstance(m, ToyModel) and self.activations.store.seq_len > m.arch.n_ctx:
                raise _KeyError(
                    ("activations", "store", "seq_len"),
                    self.activations.store.seq_len,
                    f"expected <= models.{name}.arch.n_ctx = {m.arch.n_ctx}",
                )
        if self.saes is not None:
            self._check_saes(self.saes)
        if self.steering is not None:
            self._check_steering(self.steering)
        if self.align is not None:
            self._check_align(self.align)
        for name in self.activations.hooks:
            if name not in self.models:
                raise _KeyError(
                    ("activations", "hooks", name), name,
                    f"expected a model listed under models ({', '.join(self.models)})",
                )  # fmt: skip
        return self

    def _check_saes(self, saes: SAEParams) -> None:

        for name in self.models:
            if name not in saes.sweep:
                raise _KeyError(
                    ("saes", "sweep", name), None, f"expected an entry for model '{name}'"
                )
        for name in saes.sweep:
            if name not in self.models:
                raise _KeyError(("saes", "sweep", name), name,
                                f"expected a model listed under models ({', '.join(self.models)})")  # fmt: skip
            for g, sweep in enumerate(saes.groups(name)):
                loc = ("saes", "sweep", name) + ((g,) if isinstance(saes.sweep[name], list) else ())
                self._check_sae_group(name, sweep, loc)
        for name in saes.sweep:  # SAE names are folder names: unique per (model, hook)
            for hook, cfgs in self.sae_plan(name).items():
                names = [c.display_name for c in cfgs]
                dup = next((n for n in names if names.count(n) > 1), None)
                if dup:
                    raise _KeyError(("saes", "sweep", name), dup,
                                    f"expected a unique SAE name per hook ({hook})")  # fmt: skip

    def _check_sae_group(self, name: str, sweep: SAESweep, loc: tuple) -> None:
        from stages.sae import parse_sae_config

        cached = self.activations.hooks.get(name, [])
        if not sweep.hooks:
            raise _KeyError((*loc, "hooks"), [], "expected at least one hook")
        for i, hook in enumerate(sweep.hooks):
            if hook not in cached:
                raise _KeyError(
                    (*loc, "hooks", i), hook, f"expected one of the cached hooks {cached}"
                )
        for i, raw in enumerate(sweep.saes):
            try:
                parse_sae_config(raw)
            except ValidationError as err:
                e = err.errors()[0]
                raise _KeyError((*loc, "saes", i, *e["loc"]), e.get("input"),
                                e["msg"].removeprefix("Value error, ")) from None  # fmt: skip
            except ValueError as err:
                raise _KeyError((*loc, "saes", i), raw.get("architecture"), str(err)) from None

    def _check_steering(self, st: SteeringParams) -> None:
        for name, ms in st.models.items():
            loc = ("steering", "models", name)
            if name not in self.models:
                raise _KeyError(loc, name,
                                f"expected a model listed under models ({', '.join(self.models)})")  # fmt: skip
            if not ms.sets:
                raise _KeyError((*loc, "sets"), [], "expected at least one contrastive set")
            for i, s in enumerate(ms.sets):
                if s not in TOY_STEERING_SETS and not s.endswith(".jsonl"):
                    raise _KeyError((*loc, "sets", i), s, "expected one of the generated sets "
                                    f"{list(TOY_STEERING_SETS)} or a .jsonl file")  # fmt: skip
            if not ms.hooks:
                raise _KeyError((*loc, "hooks"), [], "expected at least one hook")
            cached = self.activations.hooks.get(name, [])
            for i, hook in enumerate(ms.hooks):
                why = check_hook_name(hook, self.models[name].n_layers)
                if why:
                    raise _KeyError((*loc, "hooks", i), hook, why)
            plan = self.sae_plan(name)
            for hook, sae in ms.saes.items():
                if hook not in cached:
                    raise _KeyError((*loc, "saes", hook), sae,
                                    f"expected a cached hook of {name}: {cached}")  # fmt: skip
                d = self.hook_width(name, hook)
                if d is None:
                    continue  # known only once the model is loaded: checked by the stage
                names = [c.with_d_in(d).display_name for c in plan.get(hook, [])]
                if sae not in names:
                    raise _KeyError((*loc, "saes", hook), sae,
                                    f"expected an SAE trained on that hook by saes.sweep.{name}: {names}")  # fmt: skip

    def _check_align(self, al: AlignParams) -> None:
        from stages.alignment.config import AlignConfig

        for key, pair in al.pairs.items():
            loc = ("align", "pairs", key)
            for side in ("a", "b"):
                m = getattr(pair, side)
                if m not in self.models:
                    raise _KeyError((*loc, side), m,
                                    f"expected a model listed under models ({', '.join(self.models)})")  # fmt: skip
            if key != f"{pair.a}__{pair.b}":
                raise _KeyError(loc, key, f"expected the pair's name '{pair.a}__{pair.b}' "
                                "(it names the output folder data/alignment/<A>__<B>)")  # fmt: skip
        try:
            AlignConfig.from_params(al.config)
        except (TypeError, ValueError) as e:
            raise _KeyError(
                ("align", "config"), al.config, str(e).removeprefix("align: ")
            ) from None

    def hook_width(self, model: str, hook: str) -> int | None:
        """Width of a hook's activations when params alone tell it (toy models, residual /
        attention / MLP outputs), else None."""
        m = self.models[model]
        residual = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out",
                    "hook_mlp_out")  # fmt: skip
        return m.arch.d_model if isinstance(m, ToyModel) and hook.endswith(residual) else None

    def sae_plan(self, model: str) -> dict[str, list]:
        """hook -> the SAE configs to train on it, in params order (all groups merged)."""
        from stages.sae import parse_sae_config

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


class _KeyError(ValueError):
    """A cross-field problem that knows exactly which key is at fault."""

    def __init__(self, loc: tuple, value: Any, expected: str):
        super().__init__(expected)
        self.loc, self.value, self.expected = loc, value, expected


# ---------------------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; a model listed twice must fail."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ParamsError(
                f"line {key_node.start_mark.line + 1}: key '{key}' appears twice "
                f"(first on line {seen[key]}), expected each key once"
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _dotted(loc: tuple) -> str:
    parts = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts)


def _format_pydantic(err: ValidationError, origin: str) -> str:
    e = err.errors()[0]
    # Drop the discriminator tag pydantic inserts into the location (models.x.toy.seed).
    loc = tuple(p for p in e["loc"] if p not in ("toy", "pretrained") or p == e["loc"][0])
    ctx = e.get("ctx") or {}
    if isinstance(ctx.get("error"), _KeyError):
        ke = ctx["error"]
        return f"{origin}: {_dotted(ke.loc)} = {ke.value!r}, {ke.expected}"
    key = _dotted(loc) or "<root>"
    kind = e["type"]
    if kind == "extra_forbidden":
        return f"{origin}: {key}: unknown key, expected one of the documented keys (see README)"
    if kind == "missing":
        return f"{origin}: {key} is missing, expected a value"
    msg = e["msg"]
    msg = msg.removeprefix("Value error, ")
    expected = {
        "greater_than_equal": f"expected a number >= {ctx.get('ge')}",
        "greater_than": f"expected a number > {ctx.get('gt')}",
        "less_than": f"expected a number < {ctx.get('lt')}",
        "int_parsing": "expected an integer",
        "int_type": "expected an integer",
        "int_from_float": "expected an integer",
        "float_parsing": "expected a number",
        "float_type": "expected a number",
        "bool_parsing": "expected true or false",
        "string_type": "expected a string",
        "list_type": "expected a list",
        "dict_type": "expected a mapping",
        "model_type": "expected a mapping",
        "literal_error": f"expected {ctx.get('expected')}",
        "union_tag_invalid": f"expected source {ctx.get('expected_tags')}",
        "union_tag_not_found": "expected a 'source' key ('toy' or 'pretrained')",
    }.get(kind, msg[:1].lower() + msg[1:])
    if kind == "union_tag_invalid":
        return f"{origin}: {key}.source = {ctx.get('tag')!r}, {expected}"
    if "input" in e and not isinstance(e["input"], dict | list) or kind.endswith("_type"):
        shown = e.get("input")
        return f"{origin}: {key} = {shown!r}, {expected}"
    return f"{origin}: {key}: {expected}"


def parse_params(raw: Any, origin: str = "params.yaml") -> Params:
    """Validate an already-loaded mapping; raise ParamsError with a one-line message."""
    if not isinstance(raw, dict):
        raise ParamsError(
            f"{origin}: expected a mapping at the top level, got {type(raw).__name__}"
        )
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format_pydantic(err, origin)) from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml (or `path`). Raises ParamsError on any problem."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: file not found, expected the pipeline's params file")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (safe loader)
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
