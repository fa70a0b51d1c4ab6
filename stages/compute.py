"""Where tensors live and at what precision: `compute.device` and `compute.precision`.

    dev = Device.from_params(params.compute.with_env())   # cpu here, cuda:0 on a GPU box
    model.to(dev.torch)
    with dev.autocast():                                   # bf16 matmuls when asked for
        logits = model(tokens.to(dev.torch))

- `device`: `cpu`, `cuda` (= `cuda:0`), `cuda:N`, or `auto` (the first GPU when torch
  sees one, else the CPU). Asking for CUDA on a machine without it is an error naming
  the key, before any work starts.
- `precision`: `fp32` (everything in float32: the reference, bit-reproducible on one
  machine) or `bf16` (matmuls in bfloat16 under `torch.autocast`; weights, optimiser
  state, losses, reductions and every stored number stay float32). SAEs on the CPU's
  sparse kernels (TopK always, the L1 family on sparse batches) use the bf16 encoder
  GEMM only to pick their latents; the picked values, the decoder and every gradient
  stay float32 (`stages/sae/sparse_ops.py`).
  SAE evaluation is float32 on any setting.

`device` is not a DVC dependency (like the torch thread count, it changes the last
bits, not what is computed); `precision` is one of the stages it affects (activations,
saes), since bf16 results differ measurably. Both are tagged on those stages' MLflow
runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from stages.compute_config import DEVICE_RE


class DeviceError(ValueError):
    """`compute.device` names a device this machine does not have."""


def resolve_device(spec: str, where: str = "compute.device") -> torch.device:
    """`spec` ('auto', 'cpu', 'cuda', 'cuda:N') as a torch.device present on this machine."""
    if not DEVICE_RE.match(spec):
        raise DeviceError(f"{where} = {spec!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"{where} = {spec!r}, but torch sees no CUDA device here (torch "
            f"{torch.__version__}, built with CUDA {torch.version.cuda}); use 'cpu' or 'auto'"
        )
    dev = torch.device(spec if ":" in spec else "cuda:0")
    if dev.index >= torch.cuda.device_count():
        raise DeviceError(
            f"{where} = {spec!r}, but this machine has {torch.cuda.device_count()} CUDA "
            f"device(s) (cuda:0..cuda:{torch.cuda.device_count() - 1})"
        )
    return dev


@dataclass(frozen=True)
class Device:
    """A device setting and precision; picklable. The setting is resolved where it is
    used, so `auto` sent to a Dask worker means that worker's GPU (one worker per GPU:
    start each with its own CUDA_VISIBLE_DEVICES), whatever the coordinator has."""

    spec: str = "cpu"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"

    @classmethod
    def from_params(cls, compute) -> Device:
        """From a `ComputeParams` (after `.with_env()`)."""
        return cls(compute.device, compute.precision)

    @property
    def torch(self) -> torch.device:
        return resolve_device(self.spec)

    @property
    def name(self) -> str:
        return str(self.torch)

    @property
    def is_cuda(self) -> bool:
        return self.torch.type == "cuda"

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for matmuls when `precision` is bf16; a no-op for fp32."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.torch.type, dtype=torch.bfloat16)

    def tags(self) -> dict[str, str]:
        """What a stage's MLflow run records about where it ran."""
        out = {"compute.device": self.name, "compute.precision": self.precision,
               "torch.num_threads": str(torch.get_num_threads())}  # fmt: skip
        if self.is_cuda:
            out["compute.device_name"] = torch.cuda.get_device_name(self.torch)
        return out


CPU = Device()


def numerics(dev: Device = CPU) -> dict[str, str | int]:
    """What decides the last bits of a computation besides its data, config and seed:
    torch's version, its intra-op thread count (CPU reductions split their sums by
    thread), the CPU kernels torch dispatches to (AVX2 / AVX512 paths add in other
    orders), the device and the precision. Two runs that agree on all of these give the
    same bytes; recorded with trained weights and checked when a checkpoint resumes."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "device": dev.name, "precision": dev.precision}  # fmt: skip


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor on any device as a numpy array (bf16 widened to float32 on the device).

    On the CPU a float32 tensor is shared, not copied."""
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.detach().cpu().numpy()


@contextlib.contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """torch's deterministic implementations for the block (the previous setting after).

    Needed where training backpropagates through advanced indexing, e.g. the embedding
    lookup `W_E[tokens]` of a HookedTransformer: on the CPU the backward of `W[idx]`
    (`index_put_` with accumulate) adds rows from several threads with atomics, so the
    order of the additions and the last bits of the gradient vary run to run (measured:
    17 different gradients in 20 identical calls with 2 threads, and a toy LM's weights
    differing between two identical training runs). The deterministic path costs the
    toy LM ~13 % of its training speed here and gives the 1-thread run's bits.

    torch's deterministic mode also fills every newly allocated tensor with NaN
    (`torch.utils.deterministic.fill_uninitialized_memory`), a guard against kernels that
    read memory before writing it. That is off for the block: no result depends on it (the
    LM's weights are bit-identical either way, tests/backbone/test_lm_determinism.py),
    and the fills were ~900 a step, 5-10 % of the toy LM's training time."""
    import torch.utils.deterministic as det

    was = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    det.fill_uninitialized_memory = False
    try:
        yield
    finally:
        det.fill_uninitialized_memory = fill
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


@contextlib.contextmanager
def on_device(module: torch.nn.Module, dev: Device) -> Iterator[torch.nn.Module]:
    """`module` moved to `dev` for the block, and back to where it was afterwards (so a
    caller's CPU model is returned as it was lent)."""
    home = next(module.parameters()).device
    if home == dev.torch:
        yield module
        return
    # Moved outside inference mode, even when lent inside it: weights moved there would
    # become inference tensors, and the module is the caller's to train on afterwards.
    with torch.inference_mode(False):
        module.to(dev.torch)
    try:
        yield module
    finally:
        with torch.inference_mode(False):
            module.to(home)
