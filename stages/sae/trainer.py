"""Train one or several SAEs on one activation source, sharing each batch. (Over 500
lines: the shared loop, checkpoint/resume with its refusals, and sparsity calibration
all act on the same per-SAE run state, `_Run`.)

    results = train_saes(source, [cfg_a, cfg_b], checkpoint_dir=Path("ckpt"))

What happens, in order:
1. every config gets `d_in` from the source (a mismatch is an error naming both);
   configs are grouped by (batch_size, seed): each group shares one pass over the data;
2. a sample of whole chunks gives the normalisation scale s = √d_in / E‖x‖ (if enabled)
   and the b_dec initialisation (mean or geometric median of s·x);
3. the loop: one batch → every SAE in the group takes an Adam step, with LR warm-up and
   decay, sparsity-coefficient warm-up, gradient clipping, decoder re-normalisation and
   dead-latent tracking (tokens since each latent last fired);
4. checkpoints (safetensors + json) every `checkpoint_every` steps; with `resume=True` a
   run restarts from its checkpoint and ends with the same weights as an uninterrupted run.
   A checkpoint records the config and a fingerprint of the data (`data_fingerprint`:
   name, shape, a hash of the first and last rows); resuming one written for another
   config or other data is an error, never a silent return of the old SAE;
5. at the end the scale is folded into the weights, so the returned SAEs act on raw
   activations.
A non-finite loss stops that SAE (the others finish), keeps its last good checkpoint and
raises `TrainingDivergedError` naming it.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from stages.compute import CPU, Device, numerics
from stages.io import load_safetensors
from stages.sae.base import BaseSAE
from stages.sae.calibrate import CONTROL_MODES, L0Controller, search_coefficient
from stages.sae.config import SAEConfig, parse_sae_config
from stages.sae.data import (
    ActivationSource,
    ShuffleLoader,
    SourceLike,
    as_source,
    data_fingerprint,
    sample_rows,
    source_name,
)
from stages.sae.registry import build_sae

CHECKPOINT_VERSION = 1


class TrainingDivergedError(RuntimeError):
    """One or more SAEs produced a non-finite loss."""


@dataclass
class TrainResult:
    """A trained SAE acting on raw activations, plus what training measured."""

    name: str
    config: SAEConfig
    sae: BaseSAE
    input_scale: float  # s used in training (already folded into the weights)
    n_steps: int
    n_tokens: int
    final_terms: dict[str, float]  # mean loss terms over the last ~1 % of steps
    train_l0: float
    dead_fraction: float  # latents silent for ≥ dead_feature_window tokens at the end
    log10_feature_density: torch.Tensor  # [d_sae], firing rate over the final window
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def geometric_median(x: torch.Tensor, n_iter: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm in float64."""
    x = x.double()
    y = x.mean(0)
    for _ in range(n_iter):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-12)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() <= tol * y.norm().clamp_min(1e-12):
            y = y_new
            break
        y = y_new
    return y.float()


def init_b_dec(x: torch.Tensor, method: str) -> torch.Tensor:
    """b_dec from a data sample: its mean, geometric median, or zeros."""
    if method == "mean":
        return x.mean(0)
    if method == "geometric_median":
        return geometric_median(x)
    if method == "zeros":
        return torch.zeros(x.shape[1])
    raise ValueError(f"b_dec_init = '{method}', expected mean, geometric_median or zeros")


class _Run:
    """One SAE being trained: model, optimiser, counters, checkpoint paths."""

    def __init__(
        self,
        cfg: SAEConfig,
        checkpoint_dir: Path | None,
        dev: Device = CPU,
        data_fp: dict[str, Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.data_fp = data_fp  # what the checkpoint records of the training data
        self.name = cfg.display_name
        self.dev = dev
        self.sae = build_sae(cfg).to(dev.torch)  # initialised on the CPU: same on any device
        self.sae.train()
        self.params = [p for _, p in self.sae.named_parameters()]
        self.param_names = [n for n, _ in self.sae.named_parameters()]
        lr_scales = self.sae.lr_scales()  # {} unless a target L0 asks (calibrate.py)
        groups: Any = self.params
        if lr_scales:
            groups = [{"params": [p], "lr_scale": lr_scales.get(n, 1.0)}
                      for n, p in zip(self.param_names, self.params, strict=True)]  # fmt: skip
        self.opt = torch.optim.Adam(
            groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), foreach=True
        )
        self.step = 0
        self.tokens_since_fired = torch.zeros(self.sae.d_sae, dtype=torch.int64, device=dev.torch)
        window_steps = max(1, min(cfg.n_steps // 10, cfg.dead_feature_window // cfg.batch_size))
        self.density_from_step = max(0, cfg.n_steps - window_steps)
        self.fire_counts = torch.zeros(self.sae.d_sae, dtype=torch.int64, device=dev.torch)
        self.ckpt = checkpoint_dir / self.name / "checkpoint" if checkpoint_dir else None
        self.last_good: tuple[Path, int] | None = None
        self.diverged: str | None = None
        self.recent: list[dict[str, float]] = []
        self.history: list[dict[str, float]] = []
        self.scale = 1.0  # input scale s this SAE trains on
        self.scale_fix = 1.0  # s / (scale applied by the loader)
        # a target L0: dual ascent on the coefficient, to the last step (held from the
        # start of the learning-rate decay instead, L0 kept falling: relu ended 13 % low)
        self.control = (
            L0Controller(
                cfg.target_l0,
                until_step=cfg.n_steps,
                rate=cfg.l0_control_rate,
                decay_steps=math.floor(cfg.lr_decay_fraction * cfg.n_steps),
                hold_until=cfg.sparsity_warmup_steps,
                **CONTROL_MODES[cfg.l0_control],
            )  # fmt: skip
            if cfg.target_l0 is not None
            and cfg.l0_control_rate > 0
            and not self.sae.loss_targets_l0
            else None
        )
        self.search: dict[str, Any] | None = None  # the calibration runs, if any
        self.retarget: dict[str, Any] | None = None  # when and where retarget_l0 moved it

    @property
    def done(self) -> bool:
        return self.diverged is not None or self.step >= self.cfg.n_steps

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.cfg.dead_feature_window

    # ---- checkpointing ----------------------------------------------------------------
    def save_checkpoint(self, scale: float) -> None:
        if self.ckpt is None:
            return
        tensors: dict[str, torch.Tensor] = {
            f"model.{k}": v.detach().contiguous().cpu() for k, v in self.sae.state_dict().items()
        }
        if not all(torch.isfinite(t).all() for t in tensors.values()):
            return  # never replace a good checkpoint with a broken one
        opt_state = self.opt.state_dict()
        for i, st in opt_state["state"].items():
            for k, v in st.items():
                tensors[f"optim.{self.param_names[i]}.{k}"] = v.detach().contiguous().cpu()
        tensors["tracker.tokens_since_fired"] = self.tokens_since_fired.cpu()
        tensors["tracker.fire_counts"] = self.fire_counts.cpu()
        meta = {
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "input_scale": scale,
            "config": self.cfg.model_dump(mode="json"),
            "data": self.data_fp,
            "numerics": numerics(self.dev),
            "recent": self.recent,
            "history": self.history,
            **({"control": self.control.state()} if self.control else {}),
            **({"retarget": self.retarget} if self.retarget else {}),
        }
        tmp = self.ckpt.with_name("checkpoint.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(tensors, tmp / "state.safetensors")
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
        old = self.ckpt.with_name("checkpoint.old")
        shutil.rmtree(old, ignore_errors=True)
        if self.ckpt.exists():
            self.ckpt.rename(old)
        tmp.rename(self.ckpt)
        shutil.rmtree(old, ignore_errors=True)
        self.last_good = (self.ckpt, self.step)

    def try_resume(self) -> float | None:
        """Load the checkpoint if there is one; returns its input scale."""
        if self.ckpt is None or not (self.ckpt / "state.json").exists():
            return None
        meta = json.loads((self.ckpt / "state.json").read_text())
        if meta.get("version") != CHECKPOINT_VERSION:
            raise ValueError(
                f"{self.ckpt}/state.json: checkpoint version {meta.get('version')}, "
                f"expected {CHECKPOINT_VERSION}"
            )
        mine = self.cfg.model_dump(mode="json")
        if meta["config"] != mine:
            diff = {
                k: (meta["config"].get(k), v) for k, v in mine.items() if meta["config"].get(k) != v
            }
            raise ValueError(
                f"{self.ckpt}: checkpoint was written for a different config of SAE "
                f"'{self.name}' (key: (checkpoint, now) = {diff}); delete it or restore the config"
            )
        self._check_data(meta.get("data"))
        self._check_numerics(meta.get("numerics"))
        tensors = load_safetensors(self.ckpt / "state.safetensors", "SAE checkpoint")
        self.sae.load_state_dict(
            {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        )
        opt_state = self.opt.state_dict()
        for i, pname in enumerate(self.param_names):
            prefix = f"optim.{pname}."
            st = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            if st:
                if "exp_avg" in st:  # keep the parameter's memory layout
                    p = self.params[i]
                    for key in ("exp_avg", "exp_avg_sq"):
                        st[key] = torch.empty_like(p).copy_(st[key])
                opt_state["state"][i] = st
        self.opt.load_state_dict(opt_state)
        self.tokens_since_fired = tensors["tracker.tokens_since_fired"].to(
            self.dev.torch, copy=True
        )
        self.fire_counts = tensors["tracker.fire_counts"].to(self.dev.torch, copy=True)
        self.step = int(meta["step"])
        self.recent = list(meta.get("recent", []))
        self.history = list(meta.get("history", []))
        if self.control is not None:
            self.control.load(meta["control"])
        self.retarget = meta.get("retarget")
        self.last_good = (self.ckpt, self.step)
        return float(meta["input_scale"])

    def _check_data(self, theirs: dict[str, Any] | None) -> None:
        """Refuse a checkpoint written for other data; one from before data fingerprints
        (no "data" key) resumes as it always did, with a warning."""
        if theirs is None:
            warnings.warn(
                f"{self.ckpt}: checkpoint of SAE '{self.name}' records no data fingerprint "
                "(written by an older version); resuming without checking that it was "
                "trained on this data",
                stacklevel=2,
            )
            return
        mine = self.data_fp or {}
        # the name is reported, not compared: the same rows under another name (a moved
        # store, an ArraySource named differently) are the same training data
        diff = {
            k: (theirs.get(k), mine.get(k))
            for k in ("n_rows", "d_in", "rows_sha256")
            if theirs.get(k) != mine.get(k)
        }
        if diff:
            raise ValueError(
                f"{self.ckpt}: checkpoint of SAE '{self.name}' was written for other data: "
                f"activation array '{theirs.get('name')}', now '{mine.get('name')}' "
                f"(key: (checkpoint, now) = {diff}). Delete {self.ckpt.parent} or pass "
                "resume=False to train from scratch on this data, or pass the data it was "
                "trained on to resume it"
            )

    def _check_numerics(self, theirs: dict[str, Any] | None) -> None:
        """Say so when the checkpoint was written under other numerics (thread count,
        torch, CPU kernels, device, precision): the run resumes, but its weights will not
        be the bytes an uninterrupted run would have given."""
        mine = numerics(self.dev)
        diff = {k: (v, mine.get(k)) for k, v in (theirs or {}).items() if mine.get(k) != v}
        if diff:
            warnings.warn(
                f"{self.ckpt}: checkpoint of SAE '{self.name}' was written under other "
                f"numerics (key: (checkpoint, now) = {diff}); resuming, but the weights will "
                "differ in the last bits from an uninterrupted run's",
                stacklevel=2,
            )

    # ---- one optimisation step ----------------------------------------------------------
    def train_step(self, x: torch.Tensor) -> None:
        cfg, sae = self.cfg, self.sae
        lr = cfg.lr_at(self.step)
        for group in self.opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        sparsity_scale = cfg.sparsity_scale_at(self.step)
        if self.control is not None:
            sparsity_scale *= self.control.multiplier
        with self.dev.autocast():
            out = sae(x, sparsity_scale=sparsity_scale, dead_mask=self.dead_mask())
        loss = float(out.loss.detach())
        if not math.isfinite(loss):
            where = (
                f"its last good checkpoint is {self.last_good[0]} (step {self.last_good[1]})"
                if self.last_good
                else "no checkpoint had been written yet"
            )
            self.diverged = (
                f"SAE '{self.name}' diverged at step {self.step}: loss = {loss}; {where}. "
                f"Try a lower lr (now {cfg.lr}) or a smaller sparsity coefficient."
            )
            return
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.before_optimizer_step()
        if cfg.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip_norm, foreach=True)
        self.opt.step()
        sae.after_optimizer_step()
        with torch.no_grad():
            self.tokens_since_fired += x.shape[0]
            self.tokens_since_fired[out.fired] = 0
            if self.step >= self.density_from_step:
                self.fire_counts += out.fire_counts
        self._record(out, x.shape[0])
        if self.control is not None:
            self.control.update(self.step, float(out.l0))
            self._maybe_retarget(x, sparsity_scale)
        self.step += 1

    def _maybe_retarget(self, x: torch.Tensor, sparsity_scale: float) -> None:
        """Once, when the L0's first fast fall is over: let the SAE move itself onto the
        target (`BaseSAE.retarget_l0`: JumpReLU's thresholds, gated's gate biases) and
        restart the controller from where it put L0 and λ."""
        ctl = self.control
        if ctl is None or self.retarget is not None or not ctl.fall_over:
            return
        lam = self.cfg.coefficient() * sparsity_scale
        with torch.no_grad():
            new_lam = self.sae.retarget_l0(x, ctl.target, lam)
            l0 = float((self.sae.encode(x) > 0).sum(-1).float().mean()) if new_lam else None
        self.retarget = {"step": float(self.step), "coefficient": new_lam, "l0": l0}
        if new_lam is not None and l0 is not None:
            ctl.restart_at(l0, new_lam / lam)

    def _record(self, out: Any, batch: int) -> None:
        l0 = float(out.l0)
        terms = {k: float(v.detach()) for k, v in out.terms.items()}
        self.recent.append({"l0": l0, **terms})
        keep = max(1, self.cfg.n_steps // 100)
        if len(self.recent) > keep:
            self.recent.pop(0)
        if self.step % max(1, self.cfg.n_steps // 50) == 0 or self.step == self.cfg.n_steps - 1:
            extra = (
                {"coefficient": self.cfg.coefficient() * self.control.multiplier}
                if self.control is not None
                else {}
            )
            self.history.append({"step": float(self.step), "l0": l0, **terms, **extra})


def train_saes(
    source: SourceLike,
    configs: list[SAEConfig | dict[str, Any]],
    *,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 1000,
    resume: bool = True,
    buffer_rows: int | None = None,
    n_norm_rows: int = 65536,
    progress: bool = True,
    stop_after_steps: int | None = None,
    device: Device = CPU,
) -> list[TrainResult]:
    """Train every config on `source`; SAEs with equal (batch_size, seed) share batches.

    `stop_after_steps` stops early after that many steps (leaving checkpoints behind, as an
    interruption would); the returned results then hold the partially trained SAEs.
    `device` (`stages.compute.Device`) is where the SAEs train and at what precision; the
    returned SAEs are on the CPU either way, checkpoints too (resumable on any device).
    `source` may also be a 2-D numpy array or torch tensor [n_rows, d_in].
    """
    source = as_source(source, "train_saes: source")
    d_in, name = source.d_in, f"activation array '{source_name(source)}'"
    cfgs = [parse_sae_config(c).with_d_in(d_in, name) for c in configs]
    names = [c.display_name for c in cfgs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"SAE configs share the name(s) {dupes}; give each a distinct 'name'")
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    data_fp = data_fingerprint(source) if ckpt_dir is not None else None
    groups: dict[tuple[int, int], list[SAEConfig]] = {}
    for c in cfgs:
        groups.setdefault((c.batch_size, c.seed), []).append(c)
    results: dict[str, TrainResult] = {}
    diverged: list[str] = []
    for (batch_size, seed), group in groups.items():
        res, div = _train_group(
            source, group, batch_size, seed, ckpt_dir, checkpoint_every, resume,
            buffer_rows, n_norm_rows, progress, stop_after_steps, device, data_fp,
        )  # fmt: skip
        results.update({r.name: r for r in res})
        diverged += div
    if diverged:
        raise TrainingDivergedError("\n".join(diverged))
    return [results[n] for n in names]


def _train_group(
    source: ActivationSource,
    cfgs: list[SAEConfig],
    batch_size: int,
    seed: int,
    ckpt_dir: Path | None,
    checkpoint_every: int,
    resume: bool,
    buffer_rows: int | None,
    n_norm_rows: int,
    progress: bool,
    stop_after_steps: int | None,
    dev: Device,
    data_fp: dict[str, Any] | None,
) -> tuple[list[TrainResult], list[str]]:
    t0 = time.perf_counter()
    sample = torch.from_numpy(sample_rows(source, n_norm_rows, seed))
    mean_norm = float(sample.norm(dim=1).mean())
    data_scale = math.sqrt(source.d_in) / mean_norm if mean_norm > 0 else 1.0

    searches: list[dict[str, Any] | None] = []
    for i, c in enumerate(cfgs):  # a target L0: calibration runs set the coefficient
        found = None
        if c.target_l0 is not None and c.calibration_runs > 0:
            scale = data_scale if c.normalize_activations else 1.0
            found = _calibrate(source, c, sample, scale, buffer_rows, dev, ckpt_dir, data_fp)
            cfgs[i] = c.model_copy(update={c.sparsity_coefficient: found["coefficient"]})
        searches.append(found)
    runs = [_Run(c, ckpt_dir, dev, data_fp) for c in cfgs]
    for run, found in zip(runs, searches, strict=True):
        run.search = found
    scales = [r.try_resume() if resume else None for r in runs]

    for run, resumed_scale in zip(runs, scales, strict=True):
        if resumed_scale is not None:
            run.scale = resumed_scale
            continue
        run.scale = data_scale if run.cfg.normalize_activations else 1.0
        with torch.no_grad():
            run.sae.b_dec.copy_(init_b_dec(sample * run.scale, run.cfg.b_dec_init))
            if run.cfg.target_l0 is not None:
                run.sae.init_for_target_l0((sample * run.scale).to(dev.torch), run.cfg.target_l0)
    # the loader thread applies the scale when all SAEs share it; otherwise each SAE
    # scales its own copy (an SAE gets bit-identical batches either way)
    loader_scale = runs[0].scale if len({r.scale for r in runs}) == 1 else 1.0
    for run in runs:
        run.scale_fix = run.scale / loader_scale

    start = min(r.step for r in runs if not r.done) if any(not r.done for r in runs) else 0
    end = max(r.cfg.n_steps for r in runs)
    if stop_after_steps is not None:
        end = min(end, start + stop_after_steps)
    bar = tqdm(
        total=end, initial=start, disable=not progress, unit="step",
        desc=f"SAEs on {source_name(source)} ({len(runs)})",
    )  # fmt: skip
    loader = ShuffleLoader(
        source, batch_size, seed=seed, buffer_rows=buffer_rows, scale=loader_scale,
        start_batch=start,
    )  # fmt: skip
    try:
        for step in range(start, end):
            x = next(loader)
            if dev.is_cuda:
                x = x.to(dev.torch, non_blocking=True)
            for run in runs:
                if run.done or run.step != step:
                    continue
                xb = x if run.scale_fix == 1.0 else x * run.scale_fix
                run.train_step(xb)
                if run.ckpt is not None and not run.done and run.step % checkpoint_every == 0:
                    run.save_checkpoint(run.scale)
            bar.update(1)
            if progress and runs[0].recent:
                bar.set_postfix(
                    {
                        r.name[:24]: f"mse={r.recent[-1]['mse']:.3g},L0={r.recent[-1]['l0']:.3g}"
                        for r in runs[:3]
                        if r.recent
                    }  # fmt: skip
                )
    finally:
        loader.close()
        bar.close()

    seconds = time.perf_counter() - t0
    results, diverged = [], []
    for run in runs:
        if run.diverged:
            diverged.append(run.diverged)
            continue
        if run.ckpt is not None and run.step != (run.last_good or (None, -1))[1]:
            run.save_checkpoint(run.scale)
        results.append(_finish(run, seconds, sample))
    return results, diverged


def _calibrate(
    source: ActivationSource,
    cfg: SAEConfig,
    sample: torch.Tensor,
    scale: float,
    buffer_rows: int | None,
    dev: Device,
    ckpt_dir: Path | None,
    data_fp: dict[str, Any] | None,
) -> dict[str, Any]:
    """`search_coefficient` for `cfg.target_l0` with short runs: each a fresh SAE (same
    seed, same first batches as the full run) trained for `calibration_steps` at one
    coefficient, its L0 measured on up to 16 384 rows of the normalisation sample. The
    result is kept beside the checkpoints, so a resumed run does not search again."""
    key = {"config": cfg.model_dump(mode="json"), "data": data_fp}
    cache = ckpt_dir / cfg.display_name / "calibration.json" if ckpt_dir else None
    if cache is not None and cache.exists():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return saved["result"]
    t0 = time.perf_counter()
    steps = cfg.calibration_steps
    shrink = steps / cfg.n_steps
    rows = (sample[:16384] * scale).to(dev.torch)

    def measure(coefficient: float) -> float:
        short = cfg.model_copy(
            update={
                cfg.sparsity_coefficient: coefficient,
                "target_l0": None,
                "n_training_tokens": steps * cfg.batch_size,
                "lr_warmup_steps": math.ceil(cfg.lr_warmup_steps * shrink),
                "sparsity_warmup_steps": math.ceil(cfg.sparsity_warmup_steps * shrink),
            }
        )
        run = _Run(short, None, dev)
        run.scale = scale
        with torch.no_grad():
            run.sae.b_dec.copy_(init_b_dec(sample * scale, cfg.b_dec_init).to(dev.torch))
            run.sae.init_for_target_l0((sample * scale).to(dev.torch), cfg.target_l0)
        loader = ShuffleLoader(source, cfg.batch_size, seed=cfg.seed, buffer_rows=buffer_rows,
                               scale=scale)  # fmt: skip
        try:
            while not run.done:
                x = next(loader)
                run.train_step(x.to(dev.torch, non_blocking=True) if dev.is_cuda else x)
        finally:
            loader.close()
        if run.diverged:
            return math.inf  # too little penalty is not how a run diverges; treat as dense
        run.sae.eval()
        with torch.no_grad():
            return float((run.sae.encode(rows) > 0).sum(-1).float().mean())

    result = search_coefficient(
        measure, cfg.coefficient(), cfg.target_l0,  # type: ignore[arg-type]
        tolerance=cfg.calibration_tolerance, max_runs=cfg.calibration_runs,
    )  # fmt: skip
    result = {
        "target_l0": cfg.target_l0,
        "coefficient_key": cfg.sparsity_coefficient,
        "start": cfg.coefficient(),
        "steps_per_run": steps,
        **result,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "result": result}, indent=1))
    return result


def _finish(run: _Run, seconds: float, sample: torch.Tensor) -> TrainResult:
    """The trained SAE on raw activations, calibrated (`BaseSAE.calibrate`) on `sample`,
    the training rows the input scale was estimated on (raw)."""
    sae = run.sae
    sae.eval()
    with torch.no_grad():
        window_tokens = max(1, (run.step - run.density_from_step)) * run.cfg.batch_size
        density = run.fire_counts.double().cpu() / window_tokens
        log_density = torch.log10(density + 1e-10).float()
        dead = float(run.dead_mask().double().mean())
    sae.cpu()
    scale = run.scale
    if scale != 1.0:
        sae.fold_input_scale(scale)
    calibration = sae.calibrate(sample)
    terms: dict[str, float] = {}
    for rec in run.recent:
        for k, v in rec.items():
            terms[k] = terms.get(k, 0.0) + v / len(run.recent)
    train_l0 = terms.pop("l0", float("nan"))
    if run.cfg.target_l0 is not None:
        ctl = run.control
        sae.metadata["sparsity_calibration"] = {
            "target_l0": run.cfg.target_l0,
            "coefficient_key": run.cfg.sparsity_coefficient,
            # calibration runs (if any): coefficients tried, L0s reached, the one kept
            "search": run.search,
            # the full run: dual ascent from the coefficient the search kept
            "control": None if ctl is None else {
                "rate": ctl.rate, "until_step": ctl.until_step, "mode": ctl.mode,
                "start_coefficient": run.cfg.coefficient(),
                "final_coefficient": run.cfg.coefficient() * ctl.multiplier,
            },
            # once the first fall of L0 was over: where the SAE moved itself (JumpReLU, gated)
            "retarget": run.retarget,
            "final_coefficient": run.cfg.coefficient() * (ctl.multiplier if ctl else 1.0),
            "train_l0": train_l0,
        }  # fmt: skip
    sae.metadata.update(
        {
            "input_scale": scale,
            "n_training_tokens": run.step * run.cfg.batch_size,
            "training_numerics": numerics(run.dev),
            **({"calibration": calibration} if calibration else {}),
        }
    )
    return TrainResult(
        name=run.name, config=run.cfg, sae=sae, input_scale=scale, n_steps=run.step,
        n_tokens=run.step * run.cfg.batch_size, final_terms=terms, train_l0=train_l0,
        dead_fraction=dead, log10_feature_density=log_density, seconds=seconds,
        history=run.history,
    )  # fmt: skip


__all__ = ["TrainResult", "TrainingDivergedError", "geometric_median", "train_saes"]
