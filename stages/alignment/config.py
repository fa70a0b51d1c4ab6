"""`align` in params.yaml: the model pairs, `AlignConfig` (every knob of the `align`
stage, `align.config`) and the steering transfer (`align.transfer`).

Its own module, free of torch and scipy (pydantic only), so that checking params.yaml
(stages/config.py, at the start of every stage) does not import the alignment machinery.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import (
    TYPE_CHECKING,
    Annotated,
    Any,
    Literal,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    create_model,
    model_validator,
)

from stages.layout import why_unsafe
from stages.models_config import a_model
from stages.params_messages import NO_VALUE, KeyProblem, Said, message
from stages.params_types import PosInt, StrictModel

if TYPE_CHECKING:
    from stages.config import Params


@dataclass(frozen=True)
class AlignConfig:
    """Every knob of `align_pair` (the `align` params schema mirrors it)."""

    hook_pairs: tuple[tuple[str, str], ...] | None = None  # None: hooks cached by both
    # SAEs matched by name (A's SAE "x" with B's SAE "x") on each compared hook pair; None:
    # the first name (sorted) both models have per hook; "all": every shared name. SAEs
    # on both sides of a hook pair with no name in common are an error, not zero pairs.
    sae_names: tuple[str, ...] | str | None = None
    split: str = "heldout"  # rows of A to use: heldout | train | all
    max_tokens: int = 200_000  # at most this many rows of the split
    # split "heldout" with fewer rows than max_tokens: add the nearest training rows (rows
    # the SAEs were trained on) up to max_tokens; False: held-out rows only
    top_up: bool = False
    chunk_rows: int = 8192  # tokens per streamed chunk (rounded to the zarr chunking)
    threshold: float = 0.5  # a feature "has a partner" when its match correlates ≥ this
    n_null: int = 1  # shuffled-token-order null passes
    null_quantile: float = 0.99  # matched scores beat this quantile of the null's
    top_k: int = 20  # top-activating tokens per latent, for the Jaccard check
    n_permutations: int = 100  # permutation p-values of the similarity measures
    # The Holm family's tests are sequential (Besag & Clifford 1991): each stops once
    # `stop_after` permutations reach its statistic, or at a cap set so that a family of
    # strong effects reaches a Holm-adjusted p ≤ `family_alpha` (pvalues.holm_caps; at
    # least n_permutations). None: every test draws n_permutations (floor 1/101 each).
    family_alpha: float | None = 0.01
    stop_after: int = 10
    n_samples: int = 2048  # subsample for mutual kNN, RSA, unbiased CKA, SVCCA, p-values
    knn_k: int = 10
    self_check_tokens: int = 16_384  # tokens for the SAE-with-itself sanity check
    # The pass over the tokens runs as n_parts contiguous ranges of chunks whose float64
    # accumulators are merged in order: on Dask workers or one after another, the same
    # numbers either way (the result depends on n_parts, never on the runner).
    n_parts: int = 2
    # The untrained-model controls (controls.py): these measures, on the subsample, for
    # (untrained A, untrained B) and (trained A, untrained B); toy models only; () turns
    # them off. RSA and unbiased CKA cost ~9 s and ~0.7 s a test at n_samples 2048 on this
    # machine (benchmarks/alignment_controls.py), so the default leaves them out.
    control_metrics: tuple[str, ...] = ("linear_cka", "mutual_knn", "svcca")
    seed: int = 0

    def __post_init__(self) -> None:
        ints = {"max_tokens": 2, "chunk_rows": 1, "n_null": 1, "top_k": 1, "n_permutations": 0,
                "n_samples": self.knn_k + 2, "knn_k": 1, "self_check_tokens": 2,
                "n_parts": 1, "seed": 0, "stop_after": 1}  # fmt: skip
        for name, low in ints.items():
            if (v := getattr(self, name)) < low:
                raise KeyProblem((name,), v, f"expected an integer ≥ {low}",
                                 text=f"align: {name} = {v}, expected an integer >= {low}")  # fmt: skip
        if not 0.0 < (q := self.null_quantile) < 1.0:
            raise KeyProblem(("null_quantile",), q, "expected in (0, 1)",
                             text=f"align: null_quantile = {q}, expected in (0, 1)")  # fmt: skip
        if (a := self.family_alpha) is not None and not 0.0 < a < 1.0:
            raise KeyProblem(("family_alpha",), a, "expected in (0, 1) or null",
                             text=f"align: family_alpha = {a}, expected in (0, 1) or null")  # fmt: skip
        if self.split not in ("heldout", "train", "all"):
            raise KeyProblem(("split",), self.split, "expected heldout, train or all",
                             text=f"align: split = {self.split!r}, expected heldout, train or all")  # fmt: skip

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
        for key in ("sae_names", "control_metrics"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])  # type: ignore[arg-type]
        return cls(**values)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- params


@functools.cache
def _align_schema() -> type[BaseModel]:
    """`AlignConfig`'s fields as a strict pydantic model: the dataclass stays the one
    place they are declared; this checks their types."""
    hints = get_type_hints(AlignConfig)
    fields: dict[str, Any] = {f.name: (_strict_scalars(hints[f.name]), f.default)
                              for f in dataclasses.fields(AlignConfig)}  # fmt: skip
    # a match "has a partner" when its correlation is >= threshold: a correlation
    fields["threshold"] = (Annotated[float, Strict(), Field(ge=-1, le=1)], fields["threshold"][1])
    return create_model("AlignConfig", __config__=ConfigDict(extra="forbid"), **fields)


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


def align_config(raw: dict[str, Any]) -> AlignConfig:
    """`align.config` as the align stage will read it; errors name the key."""
    schema = _align_schema()
    try:
        schema.model_validate(raw)
    except ValidationError as err:
        raise Said(message(err.errors()[0], schema, raw, ("align", "config"))) from None
    try:
        return AlignConfig.from_params(raw)
    except KeyProblem as e:  # its own range checks
        raise Said(e.render(("align", "config"))) from None


class AlignPair(StrictModel):
    a: str
    b: str


class SteeringTransfer(StrictModel):
    """Carry A's steering vectors to B through the Hungarian feature matches."""

    method: Literal["nnls", "encode"] = "nnls"  # A's vector -> A's feature coefficients
    k: PosInt | None = None  # keep only the top-k features (None: all)
    # drop matches whose activation correlation (the match score) is below this
    min_correlation: Annotated[float, Field(ge=-1, le=1)] | None = None
    # the null: random directions of B's own vector's norm (p-value floor 1 / (n + 1))
    n_random: Annotated[int, Field(ge=2)] = 32
    # where none of the first n_random reaches the carried vector, draw on to this many in
    # all (None: 4 × n_random); a study plans it for its family (flows/seed_study.py)
    extend_to: Annotated[int, Field(ge=2)] | None = None

    @model_validator(mode="after")
    def _extend_at_least_n_random(self):
        if self.extend_to is not None and self.extend_to < self.n_random:
            raise ValueError(f"extend_to = {self.extend_to}: expected at least n_random "
                             f"({self.n_random}), or null")  # fmt: skip
        return self


class AlignParams(StrictModel):
    # name "<A>__<B>" -> the pair; output data/alignment/<A>__<B>/
    pairs: dict[str, AlignPair]
    # `AlignConfig` fields (hook_pairs, sae_names, max_tokens, threshold, n_null,
    # n_permutations, n_samples, knn_k, seed, ...)
    config: dict[str, Any] = {}
    transfer: SteeringTransfer = SteeringTransfer()

    def check(self, p: Params) -> None:
        """Against `models`, `activations` and `saes`: pairs of two known models, named
        `<A>__<B>`, and hooks and SAE names of `config` that both models have."""
        for key, pair in self.pairs.items():
            loc = ("align", "pairs", key)
            for side in ("a", "b"):
                m = getattr(pair, side)
                if m not in p.models:
                    raise KeyProblem((*loc, side), m, a_model(p.models))
            if pair.a == pair.b:
                raise KeyProblem((*loc, "b"), pair.b, f"expected a model other than a = '{pair.a}'")
            if key != f"{pair.a}__{pair.b}":
                raise KeyProblem(loc, key, f"expected the pair's name '{pair.a}__{pair.b}' "
                                "(it names the output folder data/alignment/<A>__<B>)")  # fmt: skip
        cfg = align_config(self.config)
        for key, pair in self.pairs.items():
            _check_pair(p, key, pair, cfg)


def _check_pair(p: Params, key: str, pair: AlignPair, cfg: AlignConfig) -> None:
    """The hooks and SAE names of `align.config`, as the align stage will read them."""
    hooks_a, hooks_b = p.hooks(pair.a), p.hooks(pair.b)
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
    folders = [p.sae_folders(m) for m in (pair.a, pair.b)]
    if any(names is None for f in folders for names in f.values()):
        return  # known only once the model is loaded: checked by the stage
    known = sorted({n for f in folders for names in f.values() for n in names or []})
    for j, n in enumerate(cfg.sae_names):
        if n not in known:
            raise KeyProblem(("align", "config", "sae_names", j), n,
                            f"expected an SAE name of saes.sweep.{pair.a} or "
                            f"saes.sweep.{pair.b} (align.pairs.{key}): {known}")  # fmt: skip
