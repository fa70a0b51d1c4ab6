"""The one typed schema for `params.yaml`, assembled from its sections.

Each section is a pydantic model beside the code that uses it, with its own checks:

    corpus       stages/corpus_config.py        CorpusParams
    models       stages/models_config.py        ToyModel | PretrainedModel
    activations  stages/activations/config.py   ActivationParams (hook names: stages/activations/hook_names.py)
    saes         stages/sae/config.py           SAEParams (+ one config class per architecture)
    steering     stages/steering/config.py      SteeringParams
    align        stages/alignment/config.py     AlignParams (+ AlignConfig)
    geometry     stages/geometry/config.py      GeometryParams
    report       stages/report/config.py        ReportParams
    compute      stages/compute_config.py       ComputeParams

A check that involves another section (a hook a model must cache, an SAE the sweep must
train) is its section's `check(params)`, called here once every section has parsed.

Every stage calls `load_params()` before doing any work. A problem in the file stops
the stage with one line naming the key, the value and what was expected, e.g.

    params.yaml: models.toy-a.arch.d_model = -4, expected an integer ≥ 1

DVC makes each stage depend on its own keys only (see `dvc.yaml`); this schema checks
the whole file every time so a typo anywhere is caught before anything is written.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError, model_validator

from stages.activations.config import ActivationParams, StoreParams
from stages.activations.hook_names import check_hook_name, hook_layer
from stages.alignment.config import AlignPair, AlignParams, SteeringTransfer
from stages.compute_config import ComputeParams, DaskParams
from stages.corpus_config import CorpusParams, HFCorpus, ToyCorpus
from stages.geometry.config import GeometryParams
from stages.models_config import (
    ModelParams,
    PretrainedModel,
    ToyArch,
    ToyModel,
    ToyTokenizer,
    ToyTrain,
    check_models,
)
from stages.params_messages import ParamsError, dotted, key_value, message
from stages.params_types import StrictModel
from stages.report.config import ReportDashboards, ReportParams
from stages.sae.config import SAEConfig, SAEEval, SAEParams, SAESweep
from stages.steering.config import (
    PROMPTS_DIR,
    TOY_STEERING_SETS,
    ModelSteering,
    SteeringConfig,
    SteeringParams,
    ToySteeringSets,
)

# the sections' names, importable from here as before the split
__all__ = [
    "PARAMS_FILE", "PROMPTS_DIR", "TOY_STEERING_SETS", "ActivationParams", "AlignPair",
    "AlignParams", "ComputeParams", "CorpusParams", "DaskParams", "GeometryParams", "HFCorpus",
    "ModelParams",
    "ModelSteering", "Params", "ParamsError", "PretrainedModel", "ReportDashboards",
    "ReportParams", "SAEEval", "SAEParams", "SAESweep", "SteeringConfig", "SteeringParams",
    "SteeringTransfer", "StoreParams", "ToyArch", "ToyCorpus", "ToyModel", "ToySteeringSets",
    "ToyTokenizer", "ToyTrain", "check_hook_name", "flatten", "hook_layer", "load_params",
    "parse_params",
]  # fmt: skip

PARAMS_FILE = Path("params.yaml")


class Params(StrictModel):
    corpus: CorpusParams = CorpusParams()
    models: dict[str, ModelParams]
    activations: ActivationParams
    saes: SAEParams | None = None
    steering: SteeringParams | None = None
    align: AlignParams | None = None
    geometry: GeometryParams = GeometryParams()
    report: ReportParams = ReportParams()
    compute: ComputeParams = ComputeParams()

    @model_validator(mode="after")
    def _sections_agree(self) -> Params:
        """Each section's checks against the others (see the module docstring)."""
        check_models(self.models)
        self.activations.check(self)
        for section in (self.saes, self.steering, self.align, self.geometry, self.report):
            if section is not None:
                section.check(self)
        return self

    def hooks(self, model: str) -> list[str]:
        return self.activations.hooks[model]

    def hook_width(self, model: str, hook: str) -> int | None:
        """Width of a hook's activations when params alone tell it (toy models), else None.
        The same rule as the activations stage's (`stages.activations.hook_names.hook_width`)."""
        return self.models[model].hook_width(hook)

    def sae_plan(self, model: str) -> dict[str, list[SAEConfig]]:
        """hook -> the SAE configs to train on it, in params order (all groups merged)."""
        return {} if self.saes is None else self.saes.plan(model)

    def sae_folders(self, model: str) -> dict[str, list[str] | None]:
        """hook -> the folder names of the SAEs trained on it (None: they need the hook's
        width, which only the loaded model tells)."""
        if self.saes is None:
            return {}
        return self.saes.folders(model, lambda hook: self.hook_width(model, hook))


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
