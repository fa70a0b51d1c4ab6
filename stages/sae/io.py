"""The SAE folder format (SAELens layout) — write it, read it, and fetch published SAEs.

A folder holds:
- `cfg.json`: SAELens 6 config (`architecture` ∈ standard/topk/jumprelu/gated, `d_in`,
  `d_sae`, `dtype`, `device`, `apply_b_dec_to_input`, `normalize_activations: "none"`
  (our normalisation is folded into the weights), `reshape_activations`, `metadata` with
  `hook_name`, `model_name`, ... and `training_architecture` (e.g. "batchtopk"); our own
  training config sits under `metadata.feature_atlas`;
- `sae_weights.safetensors`: `W_enc [d_in, d_sae]`, `W_dec [d_sae, d_in]`, `b_enc`,
  `b_dec`, `threshold` (jumprelu, batchtopk), `b_gate`/`r_mag`/`b_mag` (gated, no `b_enc`);
- `sparsity.safetensors` (optional): `sparsity` = log10 feature density per latent;
- `metrics.json` (ours): the evaluation;
- `checksums.json` (ours): the sha256 of `sae_weights.safetensors` (and of
  `sparsity.safetensors`), checked on every load: a flipped bit in the payload still
  parses as safetensors, and `load_sae` refuses it, as it refuses non-finite weights.

`sae_lens.SAE.load_from_disk(folder)` loads it (tested), and `load_sae(folder)` reads any
SAELens-format folder into our classes.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from safetensors import safe_open
from safetensors.torch import save_file

from stages.io import load_safetensors
from stages.sae.base import BaseSAE
from stages.sae.config import PretrainedSAE
from stages.sae.registry import SAELENS_READERS, build_sae, saelens_reader

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"
METRICS_FILENAME = "metrics.json"
CHECKSUMS_FILENAME = "checksums.json"  # sha256 of the weight files; SAELens ignores it
# the SAELens config format we write (>= 6.0 means "no legacy key renaming" to SAELens)
SAELENS_FORMAT_VERSION = "6.0.0"


class SAEFormatError(ValueError):
    """A folder does not hold a loadable SAE."""


def _json_safe(obj: Any, sig: int | None = None) -> Any:
    """JSON-ready copy; with `sig`, floats rounded to that many significant digits."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v, sig) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v, sig) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # strict JSON has no NaN / inf
    if isinstance(obj, float) and sig is not None:
        return round_metric(obj, sig)
    if isinstance(obj, torch.Tensor):
        return _json_safe(obj.tolist(), sig)
    return obj


# Evaluation sums run in parallel threads, so their last bits depend on the thread count
# (2 in a local process, 1 in a default Dask worker). 10 significant digits keeps every
# meaningful digit and makes metrics.json the same bytes wherever it was computed.
METRIC_DIGITS = 10


def round_metric(x: float, sig: int = METRIC_DIGITS) -> float:
    """`x` to `sig` significant digits (what metrics.json and the sweep plots store)."""
    return float(f"{x:.{sig}g}")


def save_sae(
    folder: str | Path,
    sae: BaseSAE,
    *,
    hook_name: str,
    model_name: str | None = None,
    log_feature_density: torch.Tensor | None = None,
    metrics: dict[str, Any] | None = None,
    training_config: BaseModel | dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write `sae` (acting on raw activations) as an SAELens-format folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tc = (
        training_config.model_dump(mode="json")
        if isinstance(training_config, BaseModel)
        else (training_config or sae.cfg.model_dump(mode="json"))
    )
    meta = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,
        "model_name": model_name,
        "hook_name": hook_name,
        "hook_head_index": None,
        "prepend_bos": True,
        "training_architecture": sae.architecture,
        "feature_atlas": {"training_config": tc, **sae.metadata},
        **(metadata or {}),
    }
    cfg = {
        "architecture": sae.saelens_architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": bool(sae.apply_b_dec_to_input),
        "normalize_activations": "none",
        "reshape_activations": "none",
        **sae.saelens_config(),
        "metadata": meta,
    }
    save_file(sae.saelens_state_dict(), folder / WEIGHTS_FILENAME)
    (folder / CFG_FILENAME).write_text(json.dumps(_json_safe(cfg), indent=2))
    if log_feature_density is not None:
        if log_feature_density.shape != (sae.d_sae,):
            raise ValueError(
                f"log_feature_density: shape {tuple(log_feature_density.shape)}, "
                f"expected ({sae.d_sae},)"
            )
        save_file(
            {"sparsity": log_feature_density.detach().float().contiguous()},
            folder / SPARSITY_FILENAME,
        )
    if metrics is not None:
        (folder / METRICS_FILENAME).write_text(
            json.dumps(_json_safe(metrics, METRIC_DIGITS), indent=2)
        )
    sums = {f: _sha256(folder / f) for f in (WEIGHTS_FILENAME, SPARSITY_FILENAME)
            if (folder / f).exists()}  # fmt: skip
    (folder / CHECKSUMS_FILENAME).write_text(json.dumps({"sha256": sums}, indent=2) + "\n")
    return folder


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def verify_checksum(folder: Path, filename: str) -> None:
    """The file's sha256 against the folder's `checksums.json`, when it lists the file
    (published SAELens folders have none: they are checked for finite weights only)."""
    sums_path = folder / CHECKSUMS_FILENAME
    if not sums_path.exists():
        return
    try:
        want = json.loads(sums_path.read_text())["sha256"].get(filename)
    except (ValueError, KeyError, AttributeError, TypeError):
        raise SAEFormatError(f"{sums_path}: not a checksum file ({{'sha256': {{file: hash}}}}); "
                             "restore the folder (`dvc checkout`) or re-run the saes stage") from None  # fmt: skip
    if want is None:
        return
    if (got := _sha256(folder / filename)) != want:
        raise SAEFormatError(f"{folder / filename}: sha256 {got[:12]}… differs from the "
                             f"{want[:12]}… recorded in {CHECKSUMS_FILENAME}; the weights are "
                             "corrupt: restore them (`dvc checkout`) or re-run the saes stage")  # fmt: skip


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise SAEFormatError(f"{path}: missing; an SAE folder needs {WEIGHTS_FILENAME}")
    state = {k: v.to(torch.float32) for k, v in load_safetensors(path, "SAE weights").items()}
    verify_checksum(path.parent, path.name)  # (after: a truncated file is named as such)
    for k, v in state.items():
        if not torch.isfinite(v).all():
            at = torch.nonzero(~torch.isfinite(v))[0].tolist()
            raise SAEFormatError(f"{path}: tensor '{k}' holds a non-finite value "
                                 f"({v[tuple(at)].item()} at {at}); expected finite weights: "
                                 "restore them (`dvc checkout`) or re-run the saes stage")  # fmt: skip
    return state


def load_sae(folder: str | Path) -> BaseSAE:
    """Read an SAELens-format folder (ours or published) into our SAE classes."""
    folder = Path(folder)
    cfg_path = folder / CFG_FILENAME
    if not cfg_path.exists():
        raise SAEFormatError(f"{cfg_path}: missing; an SAE folder needs {CFG_FILENAME}")
    cfg = json.loads(cfg_path.read_text())
    meta = cfg.get("metadata") or {}
    arch = cfg.get("architecture", "standard")
    if arch not in SAELENS_READERS:
        raise SAEFormatError(
            f"{cfg_path}: architecture '{arch}' is not supported; expected one of "
            f"{sorted(SAELENS_READERS)}"
        )
    cls = saelens_reader(arch, meta.get("training_architecture"))
    for key in ("d_in", "d_sae"):
        if key not in cfg:
            raise SAEFormatError(f"{cfg_path}: missing key '{key}'")
    norm = cfg.get("normalize_activations", "none")
    if norm in (False, None):
        norm = "none"
    if norm != "none":
        raise SAEFormatError(
            f"{cfg_path}: normalize_activations = '{norm}'; only 'none' (scale folded into "
            "the weights) can be loaded, fold the normalisation first"
        )
    if cfg.get("reshape_activations", "none") not in ("none", "hook_z"):
        raise SAEFormatError(f"{cfg_path}: unsupported reshape_activations")
    state = _read_weights(folder / WEIGHTS_FILENAME)
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    raw: dict[str, Any] = {
        "architecture": cls.architecture,
        "d_in": d_in,
        "d_sae": d_sae,
        "n_training_tokens": 4096,  # training fields are unknown for a loaded SAE
        "batch_size": 4096,
        "normalize_activations": False,
        "name": folder.name,
        # the architecture's own fields (k, ...), its weights put into our form
        **cls.from_saelens(cfg, meta, state, where=str(folder)),
    }
    sae = build_sae(raw)
    sae.apply_b_dec_to_input = bool(cfg.get("apply_b_dec_to_input", True))
    unknown = set(state) - set(sae.state_dict()) - {"finetuning_scaling_factor", "scaling_factor"}
    if unknown:
        raise SAEFormatError(
            f"{folder / WEIGHTS_FILENAME}: unexpected tensors {sorted(unknown)} for a {arch} SAE"
        )
    sae.load_saelens_state_dict(state, where=str(folder / WEIGHTS_FILENAME))
    sae.metadata = {k: v for k, v in meta.items() if k != "feature_atlas"}
    sae.metadata.update(meta.get("feature_atlas", {}) if isinstance(meta, dict) else {})
    sae.eval()
    return sae


def load_log_feature_density(folder: str | Path) -> torch.Tensor | None:
    path = Path(folder) / SPARSITY_FILENAME
    if not path.exists():
        return None
    verify_checksum(path.parent, path.name)
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("sparsity")


def read_metrics(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / METRICS_FILENAME).read_text())


def load_pretrained_sae(release: str, sae_id: str) -> BaseSAE:
    """A published SAE from SAELens' registry (`pretrained_saes.yaml`), via SAELens'
    own loaders (any of its download formats), converted into our classes.

    Needs the `sae-lens` package and either network access to the Hugging Face Hub or an
    HF cache already holding the files; otherwise raises naming what it needed.
    """
    try:
        from sae_lens import SAE
        from sae_lens.loading.pretrained_saes_directory import (
            get_pretrained_saes_directory,
            get_repo_id_and_folder_name,
        )
    except ImportError as e:
        raise ImportError(
            f"loading pretrained SAE {release}/{sae_id} needs the 'sae-lens' package "
            "(pip install 'sae-lens>=6,<7')"
        ) from e
    directory = get_pretrained_saes_directory()
    if release not in directory:
        raise SAEFormatError(
            f"release '{release}' is not in SAELens' pretrained SAE registry "
            f"({len(directory)} releases, e.g. {sorted(directory)[:3]})"
        )
    if sae_id not in directory[release].saes_map:
        ids = list(directory[release].saes_map)
        raise SAEFormatError(f"release '{release}' has no SAE '{sae_id}' (e.g. {ids[:5]})")
    repo_id, hf_folder = get_repo_id_and_folder_name(release, sae_id)
    try:
        sae_lens_sae = SAE.from_pretrained(release, sae_id, device="cpu")
    except Exception as e:  # network / cache errors come in many types
        raise ConnectionError(
            f"could not load pretrained SAE {release}/{sae_id}: it needs the files under "
            f"'{hf_folder}' of the Hugging Face repo '{repo_id}', downloaded from "
            "huggingface.co or present in the HF cache (HF_HOME); the download failed "
            f"with {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        ) from e
    return from_saelens(sae_lens_sae, name=f"{release}/{sae_id}")


def resolve_pretrained_sae(entry: PretrainedSAE, where: str, d_in: int | None = None) -> BaseSAE:
    """The SAE a `saes.pretrained.<model>.<name>` entry names (`where`: that key), loaded
    into our classes: from SAELens' registry through the HF hub or cache, or from a local
    SAELens-format folder. The one place a pretrained SAE is resolved: the saes stage
    calls it and writes the result beside the trained SAEs, where every later stage reads it.

    Checks what can be checked against the entry: the SAE's own hook (when its cfg names
    one) is `entry.hook`, and its width is `d_in` (the cached hook's, when given).
    Raises one line naming the key and what it needed."""
    try:
        if entry.path is not None:
            sae = load_sae(entry.path)
        else:
            sae = load_pretrained_sae(entry.release, entry.sae_id)  # type: ignore[arg-type]
    except ImportError as e:
        raise ImportError(f"{where}: {e}") from e
    except ConnectionError as e:
        raise ConnectionError(f"{where}: {e}") from e
    except (SAEFormatError, FileNotFoundError) as e:
        raise SAEFormatError(f"{where}: {e}") from e
    own_hook = sae.metadata.get("hook_name")
    if own_hook and own_hook != entry.hook:
        raise SAEFormatError(f"{where}.hook = '{entry.hook}', but {entry.source()} was trained "
                             f"on '{own_hook}'; expected its own hook")  # fmt: skip
    if d_in is not None and sae.d_in != d_in:
        raise SAEFormatError(f"{where}: {entry.source()} reads d_in = {sae.d_in}, but "
                             f"{entry.hook} is {d_in} wide; expected an SAE of that width")  # fmt: skip
    # what save_sae writes under metadata.feature_atlas: the source, and the SAELens
    # metadata it came with (its model_name is SAELens', e.g. gpt2-small, not ours)
    trained_as = {k: v for k, v in sae.metadata.items()
                  if k in ("model_name", "hook_name", "dataset_path", "context_size")}  # fmt: skip
    sae.metadata = {"pretrained": entry.model_dump(exclude_none=True), "trained_as": trained_as}
    return sae


def from_saelens(sae_lens_sae: Any, name: str = "saelens") -> BaseSAE:
    """Convert an in-memory `sae_lens.SAE` (inference or training class) to ours, by
    writing it to a temporary SAELens folder and reading that back."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name.replace("/", "__")
        sae_lens_sae.save_model(path)
        cfg = json.loads((path / CFG_FILENAME).read_text())
        if cfg.get("normalize_activations") == "expected_average_only_in":
            raise SAEFormatError(
                f"SAE {name}: normalize_activations = expected_average_only_in without a known "
                "scaling factor; fold it with SAELens first"
            )
        return load_sae(path)


def load_model_saes(
    root: Path,
) -> tuple[dict[str, dict[str, BaseSAE]], dict[str, dict[str, dict[str, int]]]]:
    """The SAEs of one model, `root` = data/saes/<model>/ (folders <hook>/<name>/), and
    each SAE's best latent per concept from its metrics.json (`ground_truth.concepts`),
    ready for `align_pair(..., saes_a, best_latents_a=...)`."""
    root = Path(root)
    saes: dict[str, dict[str, BaseSAE]] = {}
    best: dict[str, dict[str, dict[str, int]]] = {}
    for cfg_path in sorted(root.glob("*/*/cfg.json")):
        folder = cfg_path.parent
        hook, name = folder.parent.name, folder.name
        saes.setdefault(hook, {})[name] = load_sae(folder)
        metrics = read_metrics(folder) if (folder / "metrics.json").exists() else {}
        concepts = (metrics.get("ground_truth") or {}).get("concepts") or {}
        best.setdefault(hook, {})[name] = {
            c: int(v["best_latent"]) for c, v in concepts.items() if v.get("n_positive", 1) > 0
        }
    if not saes:
        raise FileNotFoundError(
            f"{root}: no SAE folders (<hook>/<name>/cfg.json); expected the saes stage's output"
        )
    return saes, best
