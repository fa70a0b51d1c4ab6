"""Feature Atlas: the domain logic, one module per concern (see README's layout).

Importing the package pins how Intel MKL (torch's CPU BLAS and vector maths here)
computes, before torch loads it, and then resolves MKL's vector-maths dispatch:

- `MKL_CBWR`, `MKL_DYNAMIC`: by default MKL may choose its code path by memory alignment
  and its thread count dynamically, both known sources of run-to-run differences in the
  last bits. A value already in the environment wins.
- `resolve_vml_dispatch`: torch sends contiguous float unary ops (`sqrt`, `exp`, `tanh`,
  ...) to MKL's VML, each intra-op thread on its own chunk. oneMKL 2024.2 (the build in
  torch 2.13's wheel) picks each VML function's kernel on that function's first call,
  and when that first call runs on two threads at once, one thread can run the
  low-accuracy AVX2 kernel for its whole chunk (pytorch/pytorch#188792). Measured here:
  Adam's first `sqrt` in an SAE's first step came out with errors up to 3e-4 relative on
  4 of 20 cold starts, and the trained weights then differed in their last bits (issue
  28: the Dask and resume tests' flake). One single-threaded call of each function
  resolves the dispatch before any concurrent use; later results are unchanged.
"""

import os

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # conditional numerical reproducibility
os.environ.setdefault("MKL_DYNAMIC", "FALSE")  # a fixed thread count

# the unary ops torch routes to MKL VML (aten/src/ATen/cpu/vml.h, UnaryOpsKernel.cpp),
# by their torch names; calling one that torch computes itself is harmless
VML_OPS = ("abs", "acos", "asin", "atan", "ceil", "cos", "cosh", "erf", "erfc", "erfinv",
           "exp", "expm1", "floor", "lgamma", "log", "log10", "log1p", "log2", "reciprocal",
           "round", "rsqrt", "sin", "sinh", "sqrt", "tan", "tanh", "trunc")  # fmt: skip


def resolve_vml_dispatch() -> None:
    """Call every VML-backed unary op once, on one element (so on this thread alone), in
    float32 and float64: MKL resolves each function's kernel before two threads can race
    to do it. Idempotent and cheap (about a millisecond)."""
    import torch

    for dtype in (torch.float32, torch.float64):
        x = torch.full((1,), 0.5, dtype=dtype)
        for op in VML_OPS:
            getattr(torch, op)(x)


resolve_vml_dispatch()
