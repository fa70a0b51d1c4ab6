"""Toy LM training step: HookedTransformer's forward against the fused engine
(stages/lm_fused.py), on the same weights and the same batch.

    python benchmarks/lm_engines.py                     # toy-a's shape, one thread
    python benchmarks/lm_engines.py --threads 2 --model toy-b --rounds 5

Each round times `--steps` full training steps (forward, backward, gradient clipping,
AdamW) of each engine in turn, after warm-up steps, on a fresh copy of the same
initialised model, under torch's deterministic algorithms as `train_toy_model` runs
them. It prints every round, the best and median step of each engine, the speed-up,
and each engine's share of the machine's float32 GEMM rate at the model's FLOPs per
training token (6 N + attention, `benchmarks/lm_world.py`'s count). The engines
alternate so that a change in the machine's speed (this VM's GEMM rate moves by 2x
within an hour) hits both.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="toy-a", help="params.yaml toy model whose shape to use")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per round and engine")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from benchmarks.lm_world import gemm_gflops
    from stages.compute import deterministic_algorithms
    from stages.config import load_params
    from stages.layout import Layout
    from stages.lm_fused import fused_loss
    from stages.models import load_tokenizer, seed_everything, toy_config

    m = load_params().models[args.model]
    t = m.train
    from transformer_lens import HookedTransformer

    # the trained tokenizer's vocabulary where the lm stage has run: BPE may stop short of
    # vocab_size (the default corpus runs out of merges)
    folder = Layout().model(args.model)
    has_tokenizer = (folder / "tokenizer.json").exists()
    vocab = len(load_tokenizer(folder)) if has_tokenizer else m.tokenizer.vocab_size
    seed_everything(m.seed)
    base = HookedTransformer(toy_config(m, vocab))
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, vocab, (t.batch_size, t.seq_len), generator=gen)
    engines = {
        "hooked": lambda model: model(batch, return_type="loss"),
        "fused": lambda model: fused_loss(model, batch),
    }
    times: dict[str, list[float]] = {e: [] for e in engines}
    with deterministic_algorithms():
        for r in range(args.rounds):
            for name, loss_of in engines.items():
                model = copy.deepcopy(base).train()
                opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(0.9, 0.99),
                                        weight_decay=t.weight_decay)  # fmt: skip

                def step(model=model, opt=opt, loss_of=loss_of) -> None:
                    loss = loss_of(model)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()

                for _ in range(3):
                    step()
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    step()
                    times[name].append(time.perf_counter() - t0)
                print(f"round {r + 1}: {name:6s} median step "
                      f"{1e3 * statistics.median(times[name][-args.steps:]):.1f} ms")  # fmt: skip
    c = base.cfg
    n = sum(p.numel() for p in base.parameters())  # benchmarks/lm_world.py's count
    flops_token = 6 * n + 6 * c.n_layers * t.seq_len * c.d_model  # + attention scores and mix
    tokens = t.batch_size * (t.seq_len - 1)
    gemm = gemm_gflops()
    print(f"{args.model}: {c.n_layers} layers, d_model {c.d_model}, {t.batch_size} x {t.seq_len} "
          f"tokens a step, {args.threads} thread(s), GEMM rate {gemm:.0f} GFLOP/s")  # fmt: skip
    med = {e: statistics.median(v) for e, v in times.items()}
    for e, v in times.items():
        rate = tokens * flops_token / med[e] / 1e9
        print(f"  {e:6s} best {1e3 * min(v):6.1f} ms, median {1e3 * med[e]:6.1f} ms a step, "
              f"{tokens / med[e]:8,.0f} tokens/s, {rate:5.1f} GFLOP/s = "
              f"{100 * rate / gemm:.0f} % of the GEMM rate")  # fmt: skip
    print(f"  fused / hooked speed-up (medians): {med['hooked'] / med['fused']:.2f}x")


if __name__ == "__main__":
    main()
