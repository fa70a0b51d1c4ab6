"""Our SAE trainer against SAELens' trainer, side by side on the same cached activations.

Same data (a float16 zarr array of synthetic activations with planted sparse features),
same architecture (TopK + AuxK), width, k, batch size, learning rate and number of
training tokens; each trainer runs in its own subprocess so peak memory (max RSS) is its
own. Both read batches through the same chunk-aligned shuffling loader, so the comparison
is of the trainers. Reported:

- tokens/s for the whole fit (norm estimate included), peak RSS, FVU and L0 on held-out
  rows (TopK: L0 = k for both, so the FVUs are at matched L0);
- SAE matmul FLOPs per token against the measured float32 GEMM rate of this machine;
- the loader alone (zarr → shuffled float32 batches) against the trainer's consumption.

    python benchmarks/sae_vs_saelens.py             # d_in 256, d_sae 4096, k 32, 1M tokens
    python benchmarks/sae_vs_saelens.py --quick     # a small smoke run
    python benchmarks/sae_vs_saelens.py --arch relu --target-l0 32   # an L1-family SAE
    python benchmarks/sae_vs_saelens.py --data data/activations/toy-a/blocks.3.hook_resid_post \
        --n 1024 --train-rows 700000 --tokens 999424 --lr 1e-3 --arch relu --target-l0 32
        # cached activations: the SAE study's settings (244 steps), the rows after 700,000
        # held out

The L1 family (`--arch relu | jumprelu | gated`): ours trains with `target_l0` (its
sparsity coefficient steered online onto the target, `stages/sae/calibrate.py`; no extra
runs), SAELens at a fixed coefficient (it has no calibration). SAELens starts at the
coefficient ours ended with; the two define their losses on other scales, so its L0 can
land elsewhere, and it gets up to `--saelens-runs` runs, each rescaling the coefficient
by (L0 / target)^(1/2) for JumpReLU and (L0 / target) otherwise. Every run's tokens/s
is reported; FVUs are compared only where both L0s sit within ±10 % of the target, and
each SAELens run is placed against ours on the (L0, FVU) plane: one dominates when it is
both sparser and reconstructs better. Ours trains the L1 family through the sparse
kernels on every batch where few latents are active (`stages/sae/sparse_ops.py`), dense
before that; SAELens trains dense throughout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.sae import TopKConfig, ZarrSource, train_saes  # noqa: E402
from stages.sae import metrics as M  # noqa: E402
from stages.sae.config import GatedConfig, JumpReLUConfig, ReLUConfig  # noqa: E402
from stages.sae.data import ShuffleLoader, iter_rows  # noqa: E402
from stages.sae.synthetic import SyntheticFeatures  # noqa: E402


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import sae_lens

    return (
        f"{cpu}; {os.cpu_count()} cores; torch {torch.__version__} ({torch.get_num_threads()} "
        f"threads); sae-lens {sae_lens.__version__}; python {platform.python_version()}; "
        f"load average {os.getloadavg()[0]:.2f}"
    )


def gemm_rate(b: int, d: int, n: int, repeats: int = 50) -> float:
    """Best-of float32 GEMM rate (FLOP/s) at the SAE encoder's shape [b, d] @ [d, n]:
    the best of 50 calls (~2-6 ms each at the toy shape) after 3 warm-up calls."""
    x, w = torch.randn(b, d), torch.randn(d, n)
    out = torch.empty(b, n)
    for _ in range(3):
        torch.mm(x, w, out=out)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(x, w, out=out)
        best = min(best, time.perf_counter() - t)
    return 2 * b * d * n / best


def make_data(path: Path, d: int, n_rows: int, n_eval: int, chunk: int) -> None:
    import zarr

    gen = SyntheticFeatures(d, 8 * d, mean_active=24, probability_decay=0.999, seed=0)
    src = gen.source(n_rows + n_eval, chunk_rows=chunk)
    z = zarr.create_array(
        path, shape=(n_rows + n_eval, d), chunks=(chunk, d), shards=(chunk * 16, d),
        dtype="float16",
    )  # fmt: skip
    for s in range(0, n_rows + n_eval, chunk * 16):
        z[s : s + chunk * 16] = src.read(s, min(s + chunk * 16, n_rows + n_eval)).astype(np.float16)


def held_out(path: Path, n_rows: int) -> ZarrSource:
    """The rows after the training rows, at most 65,536 of them."""
    from stages.sae.data import SliceSource

    src = ZarrSource.open(str(path), "")
    return SliceSource(src, n_rows, min(src.n_rows, n_rows + 16 * 4096))  # type: ignore[return-value]


def fit_saelens(sae, train, args: argparse.Namespace) -> None:
    """SAELens' own trainer on our shuffling loader, the same schedule as ours: constant
    lr, decayed over the last 20 %, no warm-up, 16 batches for the norm estimate."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    steps = args.tokens // args.batch
    tcfg = SAETrainerConfig(
        total_training_samples=args.tokens + 16 * args.batch,  # + the norm estimate
        train_batch_size_samples=args.batch, lr=args.lr, lr_end=args.lr,
        lr_decay_steps=int(0.2 * steps), lr_warm_up_steps=0, device="cpu",
        dead_feature_window=max(1, args.dead_window // args.batch),
        feature_sampling_window=10**9, n_batches_for_norm_estimate=16,
    )  # fmt: skip
    loader = ShuffleLoader(train, args.batch, seed=0)
    trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=loader)
    trainer.n_training_samples = 16 * args.batch  # the norm-estimate batches count
    trainer.fit()
    loader.close()


def evaluate(encode, decode, source) -> dict[str, float]:
    stats = None
    with torch.no_grad():
        for x in iter_rows(source, 4096):
            f = encode(x)
            if stats is None:
                stats = M.ReconstructionStats(x.shape[1], f.shape[1])
            stats.update(x, decode(f), f)
    out = stats.compute()  # type: ignore[union-attr]
    return {"fvu": out["fvu"], "l0": out["l0"], "dead_fraction": out["dead_fraction"]}


def worker(args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(0)
    path = Path(args.data)
    full = ZarrSource.open(str(path), "")
    from stages.sae.data import SliceSource

    train = SliceSource(full, 0, args.train_rows)
    ev = held_out(path, args.train_rows)
    # the GEMM rate in this process, just before and just after the fit: on this VM it
    # moved between 77 and 173 GFLOP/s at the toy shape within an hour
    rate_before = gemm_rate(args.batch, args.d, args.n)
    res = _fit(args, train, ev)
    res["gemm_rate"] = [rate_before, gemm_rate(args.batch, args.d, args.n)]
    return res


def _fit(args: argparse.Namespace, train, ev) -> dict[str, float]:
    common = dict(d_in=args.d, d_sae=args.n, k=args.k, lr=args.lr, batch_size=args.batch)
    t0 = time.perf_counter()
    if args.arch != "topk":
        return l1_family_worker(args, train, ev, t0)
    if args.worker in ("ours", "ours-dense"):
        cfg = TopKConfig(
            **common, n_training_tokens=args.tokens, lr_warmup_steps=0, lr_decay_fraction=0.2,
            dead_feature_window=args.dead_window, b_dec_init="geometric_median",
            use_sparse_kernels=args.worker == "ours",
        )  # fmt: skip
        (r,) = train_saes(train, [cfg], progress=False, n_norm_rows=16 * args.batch)
        seconds = time.perf_counter() - t0
        sae = r.sae
        res = evaluate(sae.encode, sae.decode, ev)
    else:
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

        scfg = TopKTrainingSAEConfig(
            d_in=args.d, d_sae=args.n, k=args.k, aux_loss_coefficient=1 / 32,
            normalize_activations="expected_average_only_in",
        )  # fmt: skip
        sae = TopKTrainingSAE(scfg)
        fit_saelens(sae, train, args)
        seconds = time.perf_counter() - t0
        sae.eval()
        res = evaluate(sae.encode, sae.decode, ev)
    res["seconds"] = seconds
    res["tokens_per_s"] = args.tokens / seconds
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


L1_FAMILY = {"relu": (ReLUConfig, "l1_coefficient"), "jumprelu": (JumpReLUConfig, "l0_coefficient"),
             "gated": (GatedConfig, "l1_coefficient")}  # fmt: skip


def l1_family_worker(args: argparse.Namespace, train, ev, t0: float) -> dict[str, float]:
    """One L1-family fit: ours calibrated to `--target-l0`, or SAELens at `--coefficient`."""
    common = dict(d_in=args.d, d_sae=args.n, lr=args.lr, batch_size=args.batch)
    if args.worker == "ours":
        cls, _ = L1_FAMILY[args.arch]
        cfg = cls(**common, n_training_tokens=args.tokens, lr_warmup_steps=0,
                  lr_decay_fraction=0.2, dead_feature_window=args.dead_window,
                  b_dec_init="geometric_median", target_l0=args.target_l0,
                  calibration_runs=args.calibration_runs)  # fmt: skip
        (r,) = train_saes(train, [cfg], progress=False, n_norm_rows=16 * args.batch)
        seconds = time.perf_counter() - t0
        res = evaluate(r.sae.encode, r.sae.decode, ev)
        res["coefficient"] = r.sae.metadata["sparsity_calibration"]["final_coefficient"]
    else:
        norm = "expected_average_only_in"
        if args.arch == "relu":
            from sae_lens.saes.standard_sae import StandardTrainingSAE as SAE
            from sae_lens.saes.standard_sae import StandardTrainingSAEConfig as Cfg

            scfg = Cfg(d_in=args.d, d_sae=args.n, l1_coefficient=args.coefficient,
                       normalize_activations=norm)  # fmt: skip
        elif args.arch == "gated":
            from sae_lens.saes.gated_sae import GatedTrainingSAE as SAE
            from sae_lens.saes.gated_sae import GatedTrainingSAEConfig as Cfg

            scfg = Cfg(d_in=args.d, d_sae=args.n, l1_coefficient=args.coefficient,
                       normalize_activations=norm)  # fmt: skip
        else:
            from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE as SAE
            from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAEConfig as Cfg

            scfg = Cfg(d_in=args.d, d_sae=args.n, l0_coefficient=args.coefficient,
                       normalize_activations=norm)  # fmt: skip
        sae = SAE(scfg)
        fit_saelens(sae, train, args)
        seconds = time.perf_counter() - t0
        sae.eval()
        res = evaluate(sae.encode, sae.decode, ev)
        res["coefficient"] = args.coefficient
    res["seconds"] = seconds
    res["tokens_per_s"] = args.tokens / seconds
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


def l1_family_main(args: argparse.Namespace, path: Path) -> None:
    """Ours calibrated to the target, then SAELens from ours' final coefficient."""

    def run(kind: str, coefficient: float | None = None) -> dict[str, float]:
        cmd = [sys.executable, __file__, "--worker", kind, "--data", str(path),
               f"--arch={args.arch}", f"--target-l0={args.target_l0}",
               f"--coefficient={coefficient or 0.0}"] + [
            f"--{k}={getattr(args, k.replace('-', '_'))}"
            for k in ("d", "n", "batch", "tokens", "train-rows", "lr", "dead-window",
                      "calibration-runs")]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(out.stderr[-3000:])
            raise SystemExit(f"worker {kind} failed")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {kind:8s} coefficient {r['coefficient']:.4g}: {r['tokens_per_s']:8.0f} tokens/s "
              f"({r['seconds']:.1f} s)  held-out FVU {r['fvu']:.4f}  L0 {r['l0']:.2f}  "
              f"dead {r['dead_fraction']:.3f}", flush=True)  # fmt: skip
        return r

    target = args.target_l0
    ours = run("ours")
    power = 0.5 if args.arch == "jumprelu" else 1.0
    coefficient, theirs = ours["coefficient"], []
    for _ in range(args.saelens_runs):
        theirs.append(run("saelens", coefficient))
        l0 = max(theirs[-1]["l0"], 0.01)
        if abs(l0 / target - 1) <= 0.10:
            break
        coefficient *= (l0 / target) ** power
    best = min(theirs, key=lambda r: abs(math.log(max(r["l0"], 0.01) / target)))
    mean_speed = sum(r["tokens_per_s"] for r in theirs) / len(theirs)
    print(f"speed-up ours / SAELens ({args.arch}): {ours['tokens_per_s'] / mean_speed:.2f}x "
          f"(SAELens' mean over its {len(theirs)} run(s); target >= 1.5x)")  # fmt: skip
    matched = all(abs(r["l0"] / target - 1) <= 0.10 for r in (ours, best))
    print(f"at target L0 {target:g}: ours L0 {ours['l0']:.2f} FVU {ours['fvu']:.4f}; SAELens' "
          f"closest L0 {best['l0']:.2f} FVU {best['fvu']:.4f} -> "
          + ("matched: FVUs compare" if matched else "not matched within ±10 %: FVUs do not "
             "compare"))  # fmt: skip
    # unmatched runs still order where one is sparser *and* reconstructs better
    for r in theirs:
        ahead = ours["l0"] <= r["l0"] and ours["fvu"] <= r["fvu"]
        behind = ours["l0"] >= r["l0"] and ours["fvu"] >= r["fvu"]
        verdict = ("ours dominates (sparser, lower FVU)" if ahead else
                   "SAELens dominates" if behind else "neither dominates")  # fmt: skip
        print(f"  against SAELens at λ {r['coefficient']:.4g} (L0 {r['l0']:.2f}, FVU "
              f"{r['fvu']:.4f}): {verdict}")  # fmt: skip
    gemm_report(args, {"ours": ours, "saelens": theirs})


def gemm_report(args: argparse.Namespace, runs: dict[str, dict | list[dict]]) -> float:
    """Each trainer's rate in dense-equivalent SAE FLOPs against the GEMM rate its own
    process measured just before and just after its fit (the higher of the two, so the
    share is the conservative one; a kind with several runs: each run against its own).
    Returns the highest rate seen."""
    dense_flops = 12 * args.d * args.n  # 6 x (2 d n): forward + backward, enc + dec
    print(f"float32 GEMM rate at [{args.batch}x{args.d}]@[{args.d}x{args.n}], best of 50 "
          f"calls, measured in each trainer's process before and after its fit:")  # fmt: skip
    top = 0.0
    for kind, rs in runs.items():
        rs = rs if isinstance(rs, list) else [rs]
        rates = [x for r in rs for x in r["gemm_rate"]]
        shares = [100 * dense_flops * r["tokens_per_s"] / max(r["gemm_rate"]) for r in rs]
        top = max(top, *rates)
        tps = sum(r["tokens_per_s"] for r in rs) / len(rs)
        print(
            f"  {kind:10s}: GEMM {min(rates) / 1e9:.0f}-{max(rates) / 1e9:.0f} GFLOP/s; "
            f"dense-equivalent SAE FLOPs/token {dense_flops / 1e6:.1f} M -> "
            f"{dense_flops * tps / 1e9:.1f} GFLOP/s = "
            + "/".join(f"{x:.0f}" for x in shares)
            + " % of the GEMM rate (target >= 50 %)"
        )
    return top


def loader_rate(path: Path, n_rows: int, batch: int, n_batches: int) -> float:
    from stages.sae.data import SliceSource

    src = SliceSource(ZarrSource.open(str(path), ""), 0, n_rows)
    with ShuffleLoader(src, batch, seed=0, scale=0.5) as loader:
        next(loader)
        t = time.perf_counter()
        for _ in range(n_batches):
            next(loader)
        return n_batches * batch / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=4096 * 256)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--dead-window", type=int, default=4096 * 50)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--skip-dense", action="store_true")
    p.add_argument("--worker", choices=["ours", "ours-dense", "saelens"])
    p.add_argument("--arch", choices=["topk", *L1_FAMILY], default="topk")
    p.add_argument("--target-l0", type=float, default=32.0, help="L1 family: ours' target")
    p.add_argument("--coefficient", type=float, default=0.0, help="(worker) SAELens' λ")
    p.add_argument("--saelens-runs", type=int, default=3)
    p.add_argument(
        "--calibration-runs",
        type=int,
        default=0,
        help="L1 family: ours' short "
        "runs searching λ before the controller (the study gives relu 3); their "
        "time counts in ours' tokens/s",
    )
    p.add_argument(
        "--train-rows",
        type=int,
        help="rows trained on (default --tokens; fewer "
        "rows than tokens: several epochs); the next 65,536 are held out",
    )
    p.add_argument(
        "--data",
        help="an existing 2-D zarr array of activations (a cached hook) "
        "instead of the synthetic one",
    )
    args = p.parse_args()
    if args.quick:
        args.d, args.n, args.k, args.batch, args.tokens = 64, 512, 8, 1024, 1024 * 40
        args.dead_window = 1024 * 10
    args.train_rows = args.train_rows or args.tokens
    if args.worker:
        print(json.dumps(worker(args)))
        return

    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        n_eval = 16 * 4096 if not args.quick else 8192
        if args.data:
            path = Path(args.data)
            src = ZarrSource.open(str(path), "")
            args.d, n_eval = src.d_in, min(n_eval, src.n_rows - args.train_rows)
            if n_eval <= 0:
                raise SystemExit(f"--data {path}: {src.n_rows} rows, --train-rows "
                                 f"{args.train_rows} leaves none held out; expected fewer")  # fmt: skip
            print(f"data: {path}, {args.train_rows} train + {n_eval} held-out rows, d_in "
                  f"{args.d}, {args.tokens} training tokens")  # fmt: skip
        else:
            path = Path(tmp) / "acts.zarr"
            t = time.perf_counter()
            make_data(path, args.d, args.train_rows, n_eval, chunk=4096)
            print(
                f"data: {args.train_rows} train + {n_eval} held-out rows, d_in {args.d}, float16 zarr "
                f"(chunks 4096 rows, shards of 16 chunks), made in {time.perf_counter() - t:.0f} s"
            )
        if args.arch != "topk":
            print(f"SAE: {args.arch}, d_sae {args.n}, target L0 {args.target_l0:g}, batch "
                  f"{args.batch}, lr {args.lr}, {args.tokens} training tokens")  # fmt: skip
            l1_family_main(args, path)
            return
        print(
            f"SAE: TopK, d_sae {args.n}, k {args.k}, batch {args.batch}, lr {args.lr}, "
            f"{args.tokens} training tokens ({args.tokens // args.batch} steps)"
        )
        results = {}
        kinds = ["ours", "saelens"] + ([] if args.skip_dense else ["ours-dense"])
        for kind in kinds:
            cmd = [sys.executable, __file__, "--worker", kind, "--data", str(path)] + [
                f"--{k}={getattr(args, k.replace('-', '_'))}"
                for k in ("d", "n", "k", "batch", "tokens", "train-rows", "lr", "dead-window")
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                print(out.stderr[-3000:])
                raise SystemExit(f"worker {kind} failed")
            results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
            r = results[kind]
            print(
                f"  {kind:10s}: {r['tokens_per_s']:9.0f} tokens/s  ({r['seconds']:.1f} s)  "
                f"peak RSS {r['peak_rss_mib']:6.0f} MiB  held-out FVU {r['fvu']:.4f}  "
                f"L0 {r['l0']:.1f}  dead {r['dead_fraction']:.3f}"
            )
        ours, theirs = results["ours"], results["saelens"]
        print(
            f"speed-up ours / SAELens: {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x "
            f"(target >= 1.5x); FVU ours {ours['fvu']:.4f} vs SAELens {theirs['fvu']:.4f} at "
            f"L0 {ours['l0']:.1f} vs {theirs['l0']:.1f}"
        )
        if "ours-dense" in results:
            print(
                f"sparse TopK kernels vs dense autograd (ours): "
                f"{ours['tokens_per_s'] / results['ours-dense']['tokens_per_s']:.2f}x"
            )

        rate = gemm_report(args, results)
        # ours: the dense encoder GEMM + five k-sparse products (decode, its two grads, the
        # encoder weight grad and input grad); AuxK adds k_aux-sparse ones while latents are dead
        executed = 2 * args.d * args.n + 10 * args.k * args.d
        print(
            f"  ours executes ~{executed / 1e6:.1f} M FLOPs/token (one dense encoder GEMM + "
            f"k-sparse decode and gradients; encoder weight grad is sparse too): "
            f"{100 * executed * ours['tokens_per_s'] / rate:.0f} % of the GEMM rate"
        )
        lr_ = loader_rate(path, args.train_rows, args.batch, min(200, args.tokens // args.batch))
        print(
            f"loader alone (zarr float16 -> shuffled, scaled float32 batches): {lr_:.0f} rows/s "
            f"= {lr_ / ours['tokens_per_s']:.1f}x our trainer's consumption (target >= 3x)"
        )


if __name__ == "__main__":
    main()
