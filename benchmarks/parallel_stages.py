"""Two stages side by side on one thread each, against one stage on all the cores.

    python benchmarks/parallel_stages.py [--steps 60]

What `atlas run`'s two-at-a-time mode (flows/parallel.py) rests on, measured on the
pipeline's heaviest stage: toy LM training steps (params.yaml's toy-a shape, random
tokens, torch's deterministic algorithms on, as `stages.models.train_toy_model` runs
them). Each figure is a fresh process training `--steps` steps after 5 warm-up steps:
- one process at `cores` torch threads (what `dvc repro` / `atlas run -j 1` gives a stage);
- one process at one thread, alone;
- two processes at one thread each, started together (what `atlas run` gives two stages).
Prints ms a step and steps a second in all, and the side-by-side gain.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TRAIN = """
import os, sys, time, torch
sys.path.insert(0, {root!r}); os.chdir({root!r})
from stages.compute import deterministic_algorithms
from stages.config import load_params
from stages.models import toy_config
from transformer_lens import HookedTransformer
m = load_params().models["toy-a"]
torch.manual_seed(0)
model = HookedTransformer(toy_config(m, m.tokenizer.vocab_size))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.01)
b, t = m.train.batch_size, m.train.seq_len
data = torch.randint(0, m.tokenizer.vocab_size, (b * 8, t), generator=torch.Generator().manual_seed(0))
def step(i):
    loss = model(data[(i % 8) * b:(i % 8 + 1) * b], return_type="loss")
    opt.zero_grad(set_to_none=True); loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
with deterministic_algorithms():
    for i in range(5): step(i)
    t0 = time.perf_counter()
    for i in range({steps}): step(i)
print((time.perf_counter() - t0) / {steps})
"""


def run(threads: int, copies: int, steps: int) -> list[float]:
    """Seconds a step of each of `copies` processes started together."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    code = TRAIN.format(root=str(ROOT), steps=steps)
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for _ in range(copies)]  # fmt: skip
    out = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("a training process failed")
    return [float(o.strip().splitlines()[-1]) for o in out]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    a = ap.parse_args()
    cores = os.cpu_count() or 1
    print(f"{platform.processor() or platform.machine()}, {cores} cores, python "
          f"{platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M')}; toy-a LM, "
          f"{a.steps} steps a process")  # fmt: skip
    (alone_all,) = run(cores, 1, a.steps)
    (alone_one,) = run(1, 1, a.steps)
    pair = run(1, 2, a.steps)
    rate_all, rate_pair = 1 / alone_all, sum(1 / s for s in pair)
    print(f"one process, {cores} threads: {alone_all * 1e3:.0f} ms a step, {rate_all:.2f} steps/s")
    print(f"one process, 1 thread:  {alone_one * 1e3:.0f} ms a step, {1 / alone_one:.2f} steps/s")
    print(f"two processes, 1 thread each: {' / '.join(f'{s * 1e3:.0f}' for s in pair)} ms a "
          f"step, {rate_pair:.2f} steps/s in all")  # fmt: skip
    print(f"side by side: {rate_pair / rate_all:.2f}x the steps a second of one process on "
          f"all {cores} cores")  # fmt: skip


if __name__ == "__main__":
    main()
