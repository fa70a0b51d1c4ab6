"""`compute.device` / `compute.precision` in SAE training and evaluation.

What is checked on this CPU machine: the explicit CPU device gives the default path's
bytes; bf16 really changes the arithmetic (TopK: only which latents are picked; the
values are float32) and costs no measurable quality on planted features; checkpoints
written under one precision resume under it. `tests/test_gpu.py`-style CUDA runs are
in `benchmarks/gpu_check.py` (needs a GPU).
"""

import pytest
import torch

from stages.compute import CPU, Device
from stages.sae import ArraySource, build_sae, evaluate_sae, parse_sae_config, train_saes
from stages.sae.sparse_ops import fixed_rows, selected_pre_acts, topk_sorted
from stages.sae.synthetic import SyntheticFeatures, mmcs

BF16 = Device("cpu", "bf16")


def _cfg(**kw):
    base = {"d_sae": 128, "n_training_tokens": 200_000, "batch_size": 512, "lr": 1e-3,
            "dead_feature_window": 20 * 512, "seed": 0}  # fmt: skip
    return parse_sae_config({**base, **kw})


@pytest.fixture(scope="module")
def planted():
    gen = SyntheticFeatures(32, 64, mean_active=4, seed=0)
    train = ArraySource(gen.source(200_000, chunk_rows=1024).materialize(), chunk_rows=1024)
    held = SyntheticFeatures(32, 64, mean_active=4, seed=0).source(8192, chunk_rows=1024)
    return gen, train, ArraySource(held.materialize(), chunk_rows=1024)


def test_selected_pre_acts_are_the_float32_values_at_the_picked_latents():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(64, 32, generator=g), torch.randn(32, 200, generator=g), torch.randn(200)
    full = x @ w + b
    _, idx = topk_sorted(full, 7)
    crow, col = fixed_rows(idx)
    got = selected_pre_acts(x, w, b, crow, col)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, full.gather(-1, idx).reshape(-1), rtol=1e-5, atol=1e-5)
    with BF16.autocast():  # autocast does not leak into the SDDMM
        assert selected_pre_acts(x, w, b, crow, col).dtype == torch.float32


@pytest.mark.parametrize("sparse", [True, False])
def test_bf16_topk_step_differs_but_keeps_float32_outputs(sparse):
    sae = build_sae(_cfg(architecture="topk", k=4, d_in=32, use_sparse_kernels=sparse))
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(1)) * 3
    ref = sae(x)
    with BF16.autocast():
        low = sae(x)
    assert low.x_hat.dtype == torch.float32 and low.loss.dtype == torch.float32
    diff = float((low.x_hat - ref.x_hat).abs().max())
    assert diff > 0, "bf16 autocast did not change anything: is it on?"
    assert float(low.loss) == pytest.approx(float(ref.loss), rel=0.02)
    low.loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in sae.parameters() if p.grad is not None)


def test_explicit_cpu_device_gives_the_default_bytes(planted):
    _, train, held = planted
    cfg = _cfg(architecture="topk", k=4, n_training_tokens=20_000)
    (a,) = train_saes(train, [cfg], progress=False)
    (b,) = train_saes(train, [cfg], progress=False, device=Device("cpu", "fp32"))
    for k, v in a.sae.state_dict().items():
        assert torch.equal(v, b.sae.state_dict()[k]), k
    m1 = evaluate_sae(a.sae, held).metrics
    m2 = evaluate_sae(a.sae, held, device=CPU).metrics
    assert m1 == m2


@pytest.mark.parametrize("arch", [{"architecture": "topk", "k": 4},
                                  {"architecture": "relu", "l1_coefficient": 1.0}])  # fmt: skip
def test_bf16_training_costs_no_quality_on_planted_features(planted, arch):
    """Measured (seed 0, 200k rows): TopK MMCS 0.90 / FVU 0.22 and ReLU MMCS 0.87 /
    FVU 0.10 under either precision, differences in the third decimal."""
    gen, train, held = planted
    res = {}
    for dev in (CPU, BF16):
        (r,) = train_saes(train, [_cfg(**arch)], progress=False, device=dev)
        m = evaluate_sae(r.sae, held).metrics
        res[dev.precision] = (mmcs(r.sae.W_dec, gen.features), m["fvu"], m["l0"])
        assert next(r.sae.parameters()).dtype == torch.float32
    (s32, f32, l32), (s16, f16, l16) = res["fp32"], res["bf16"]
    assert s32 > 0.8 and abs(s16 - s32) < 0.01, res
    assert abs(f16 - f32) < 0.01 and abs(l16 - l32) / l32 < 0.02, res
    assert (s16, f16) != (s32, f32), "identical results: bf16 had no effect"


def test_bf16_resume_equals_an_uninterrupted_bf16_run(tmp_path, planted):
    _, train, _ = planted
    cfg = _cfg(architecture="topk", k=4, n_training_tokens=512 * 30)
    (full,) = train_saes(train, [cfg], progress=False, device=BF16)
    train_saes(train, [cfg], progress=False, device=BF16, checkpoint_dir=tmp_path,
               checkpoint_every=10, stop_after_steps=17)  # fmt: skip
    (resumed,) = train_saes(train, [cfg], progress=False, device=BF16, checkpoint_dir=tmp_path,
                            checkpoint_every=10)  # fmt: skip
    for k, v in full.sae.state_dict().items():
        assert torch.equal(v, resumed.sae.state_dict()[k]), k


def test_cuda_requested_without_cuda_is_refused_naming_the_key():
    from stages.compute import DeviceError, resolve_device

    assert resolve_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available()
                                      else torch.device("cpu"))  # fmt: skip
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match=r"compute.device = 'tpu'.*'auto', 'cpu', 'cuda'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match=r"ATLAS_DEVICE = 'cuda:1'.*no CUDA device"):
            resolve_device("cuda:1", "ATLAS_DEVICE")


def test_precision_and_device_in_params(monkeypatch):
    import yaml

    from stages.config import ComputeParams, ParamsError, parse_params

    c = ComputeParams()
    assert (c.device, c.precision) == ("auto", "fp32")
    monkeypatch.setenv("ATLAS_DEVICE", "cpu")
    assert c.with_env().device == "cpu"
    monkeypatch.setenv("ATLAS_DEVICE", "gpu")
    with pytest.raises(ParamsError, match="ATLAS_DEVICE = 'gpu'"):
        c.with_env()
    raw = yaml.safe_load(open("params.yaml"))
    with pytest.raises(ParamsError, match="compute.precision"):
        parse_params({**raw, "compute": {"precision": "fp16"}})
    with pytest.raises(ParamsError, match="compute.device"):
        parse_params({**raw, "compute": {"device": "cuda:one"}})
