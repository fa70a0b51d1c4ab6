import json
import math

import numpy as np
import pytest
import torch
import zarr

from stages.sae import ArraySource, SliceSource, ZarrSource, train_saes
from stages.sae.data import NonFiniteActivationsError, ShuffleLoader
from stages.sae.synthetic import SyntheticFeatures
from stages.sae.trainer import TrainingDivergedError, geometric_median

D = 16


def data(n=6000, seed=0):
    gen = SyntheticFeatures(D, 32, mean_active=3, seed=seed)
    return gen.source(n, chunk_rows=500).materialize() * 7 + 2  # far from E‖x‖ = √d


def cfg(**kw):
    base = {
        "architecture": "topk",
        "k": 3,
        "d_sae": 32,
        "n_training_tokens": 256 * 24,
        "batch_size": 256,
        "lr": 3e-3,
        "dead_feature_window": 256 * 4,
        "b_dec_init": "mean",
    }
    return {**base, **kw}


class SpySource(ArraySource):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.reads = []

    def read(self, start, stop):
        self.reads.append((start, stop))
        return super().read(start, stop)


def weights(result):
    return {k: v.clone() for k, v in result.sae.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_loader_reads_whole_chunks_and_covers_each_row_once_per_epoch():
    arr = np.arange(1050 * 2, dtype=np.float32).reshape(1050, 2)
    src = SpySource(arr, chunk_rows=100)
    with ShuffleLoader(src, 50, seed=3, buffer_rows=300) as loader:
        rows = torch.cat([next(loader) for _ in range(21)])  # exactly one epoch
    for start, stop in src.reads:
        assert start % 100 == 0 and (stop - start == 100 or stop == 1050)
    assert sorted(rows[:, 0].tolist()) == arr[:, 0].tolist()
    assert not torch.equal(rows, torch.from_numpy(arr))  # shuffled


def test_loader_is_a_function_of_seed_and_position():
    src = ArraySource(np.random.default_rng(0).random((1000, 3), dtype=np.float32), chunk_rows=64)
    with ShuffleLoader(src, 70, seed=1) as a:
        batches = [next(a) for _ in range(40)]  # crosses several epochs
    with ShuffleLoader(src, 70, seed=1, start_batch=23) as b:
        assert torch.equal(next(b), batches[23]) and torch.equal(next(b), batches[24])
    with ShuffleLoader(src, 70, seed=2, prefetch=False) as c:
        assert not torch.equal(next(c), batches[0])


def test_training_reduces_error_and_folds_the_scale():
    x = data()
    c = cfg(n_training_tokens=256 * 100, lr=1e-2)
    (r,) = train_saes(ArraySource(x, chunk_rows=500), [c], progress=False)
    assert r.input_scale == pytest.approx(math.sqrt(D) / np.linalg.norm(x, axis=1).mean(), rel=0.05)
    xt = torch.from_numpy(x[:2000])
    with torch.no_grad():
        x_hat = r.sae.decode(r.sae.encode(xt))  # raw activations in, raw out
    fvu = float((xt - x_hat).pow(2).sum() / (xt - xt.mean(0)).pow(2).sum())
    assert fvu < 0.3
    assert r.n_tokens == 256 * 100 and r.train_l0 == pytest.approx(3, abs=0.01)
    assert r.log10_feature_density.shape == (32,)


def test_deterministic_given_seed_and_seed_matters():
    src = ArraySource(data(), chunk_rows=500)
    a = weights(train_saes(src, [cfg()], progress=False)[0])
    b = weights(train_saes(src, [cfg()], progress=False)[0])
    c = weights(train_saes(src, [cfg(seed=1)], progress=False)[0])
    assert_same(a, b)
    assert not torch.equal(a["W_dec"], c["W_dec"])


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "batchtopk", "jumprelu-target"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, arch):
    # jumprelu-target: the L0 controller's state and θ's own learning rate are resumed too
    extra = {"topk": {}, "jumprelu": {"l0_coefficient": 0.01}, "batchtopk": {"k": 3},
             "jumprelu-target": {"l0_coefficient": 0.01, "target_l0": 3.0}}[arch]  # fmt: skip
    arch = arch.removesuffix("-target")
    c = cfg(architecture=arch, sparsity_warmup_steps=5, lr_warmup_steps=3, **extra)
    if arch == "jumprelu":
        c.pop("k")
    src = ArraySource(data(), chunk_rows=500)
    full = weights(train_saes(src, [c], progress=False)[0])
    ck = tmp_path / "ck"
    train_saes(src, [c], checkpoint_dir=ck, checkpoint_every=4, stop_after_steps=10, progress=False)
    # the interrupted run left a checkpoint at step 10 (the last multiple of 4 is 8, plus
    # the one written when it stopped); resuming continues from there
    resumed = train_saes(src, [c], checkpoint_dir=ck, checkpoint_every=4, progress=False)[0]
    assert resumed.n_steps == 24
    assert_same(full, weights(resumed))


def test_resume_refuses_a_changed_config(tmp_path):
    src = ArraySource(data(), chunk_rows=500)
    train_saes(src, [cfg(name="a")], checkpoint_dir=tmp_path, stop_after_steps=3, progress=False)
    with pytest.raises(ValueError, match="different config.*'lr'"):
        train_saes(src, [cfg(name="a", lr=1e-3)], checkpoint_dir=tmp_path, progress=False)


def test_saes_sharing_a_pass_equal_saes_trained_alone():
    src = ArraySource(data(), chunk_rows=500)
    c1, c2 = (
        cfg(),
        cfg(architecture="relu", d_sae=24, l1_coefficient=0.5, normalize_activations=False),
    )
    c2.pop("k")
    both = train_saes(src, [c1, c2], progress=False)
    assert [r.name for r in both] == ["topk-32-k3", "relu-24-l1c0.5"]
    assert_same(weights(both[0]), weights(train_saes(src, [c1], progress=False)[0]))
    assert_same(weights(both[1]), weights(train_saes(src, [c2], progress=False)[0]))
    assert both[1].input_scale == 1.0


def test_zarr_source_trains_like_the_array(tmp_path):
    x = data().astype(np.float16)
    z = zarr.create_array(tmp_path / "acts.zarr", shape=x.shape, chunks=(500, D), dtype="float16")
    z[:] = x
    zs = ZarrSource(zarr.open_array(tmp_path / "acts.zarr", mode="r"), name="acts.zarr")
    assert zs.chunk_rows == 500
    a = weights(train_saes(zs, [cfg()], progress=False)[0])
    b = weights(train_saes(ArraySource(x, chunk_rows=500), [cfg()], progress=False)[0])
    assert_same(a, b)


def test_non_finite_rows_are_named():
    x = data()
    x[4321, 5] = np.nan
    with pytest.raises(NonFiniteActivationsError, match=r"'layer3': row 4321 .*nan at column 5"):
        train_saes(ArraySource(x, chunk_rows=500, name="layer3"), [cfg()], progress=False)
    x[4321, 5] = 0
    x[17, 0] = np.inf
    with pytest.raises(NonFiniteActivationsError, match="row 17 "):
        train_saes(ArraySource(x, chunk_rows=500, name="layer3"), [cfg()], progress=False)


def test_d_in_mismatch_names_both():
    src = ArraySource(data(), chunk_rows=500, name="blocks.0.hook_resid_post")
    with pytest.raises(
        ValueError,
        match=r"d_in = 20, but activation array 'blocks.0.hook_resid_post' has d_in = 16",
    ):
        train_saes(src, [cfg(d_in=20)], progress=False)


def test_divergence_stops_keeps_last_good_checkpoint_and_others_finish(tmp_path):
    from safetensors.torch import load_file

    x = data()
    src = ArraySource(x, chunk_rows=500)
    bad = cfg(
        name="bad",
        architecture="relu",
        d_sae=32,
        lr=1e9,
        l1_coefficient=0.0,
        grad_clip_norm=None,
        normalize_activations=False,
        n_training_tokens=256 * 60,
    )
    bad.pop("k")
    with pytest.raises(TrainingDivergedError) as e:
        train_saes(
            src,
            [bad, cfg(name="good")],
            checkpoint_dir=tmp_path,
            checkpoint_every=1,
            progress=False,
        )
    msg = str(e.value)
    assert "SAE 'bad' diverged at step" in msg and "last good checkpoint" in msg
    state = load_file(tmp_path / "bad" / "checkpoint" / "state.safetensors")
    assert all(torch.isfinite(t.float()).all() for t in state.values())
    assert (tmp_path / "good" / "checkpoint" / "state.json").exists()


def test_geometric_median_resists_outliers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(201, 3, generator=g) * 0.01
    x[:60] += 1000.0
    assert geometric_median(x).norm() < 1.0 < x.mean(0).norm()


def test_resume_refuses_a_checkpoint_written_for_other_data(tmp_path):
    """Re-running a notebook cell on re-cached activations or another hook must not hand
    back the SAE trained on the old data (a finished checkpoint used to resume in 0 steps)."""
    x = data()
    (old,) = train_saes(ArraySource(x, 500), [cfg()], checkpoint_dir=tmp_path, progress=False)
    folder = tmp_path / "topk-32-k3" / "checkpoint"
    noise = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    later = x.copy()
    later[-1] += 1  # the first rows agree: the last ones are hashed too
    for other in (noise, later, x[:5000]):
        with pytest.raises(ValueError, match="written for other data") as e:
            train_saes(
                ArraySource(other, 500, name="acts"),
                [cfg()],
                checkpoint_dir=tmp_path,
                progress=False,
            )
        msg = str(e.value)
        assert str(folder) in msg and "'array', now 'acts'" in msg
        assert "resume=False" in msg and f"Delete {folder.parent}" in msg
    assert "'rows_sha256'" in msg and "'n_rows': (6000, 5000)" in msg
    # an interrupted checkpoint is refused too
    train_saes(
        ArraySource(x, 500),
        [cfg(name="p")],
        checkpoint_dir=tmp_path,
        stop_after_steps=5,
        progress=False,
    )
    with pytest.raises(ValueError, match=r"p/checkpoint: checkpoint of SAE 'p' .*other data"):
        train_saes(
            ArraySource(noise, 500), [cfg(name="p")], checkpoint_dir=tmp_path, progress=False
        )
    # resume=False trains afresh on the new data, and the checkpoint is then theirs
    (fresh,) = train_saes(
        ArraySource(noise, 500), [cfg()], checkpoint_dir=tmp_path, resume=False, progress=False
    )
    assert_same(
        weights(fresh), weights(train_saes(ArraySource(noise, 500), [cfg()], progress=False)[0])
    )
    assert not torch.equal(weights(fresh)["W_dec"], weights(old)["W_dec"])
    (again,) = train_saes(
        ArraySource(noise, 500, name="renamed"), [cfg()], checkpoint_dir=tmp_path, progress=False
    )
    assert_same(weights(again), weights(fresh))  # same rows under another name: resumed


def test_checkpoint_without_data_fingerprint_still_resumes(tmp_path):
    """Checkpoints written before data fingerprints resume as before (the pipeline guards
    its own with fingerprint.json), with a warning that the data went unchecked."""
    src = ArraySource(data(), chunk_rows=500)
    full = weights(train_saes(src, [cfg()], progress=False)[0])
    train_saes(
        src,
        [cfg()],
        checkpoint_dir=tmp_path,
        checkpoint_every=4,
        stop_after_steps=10,
        progress=False,
    )
    state = tmp_path / "topk-32-k3" / "checkpoint" / "state.json"
    meta = json.loads(state.read_text())
    assert meta["data"]["n_rows"] == 6000 and meta["data"]["d_in"] == D
    del meta["data"]
    state.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="records no data fingerprint"):
        (r,) = train_saes(src, [cfg()], checkpoint_dir=tmp_path, checkpoint_every=4, progress=False)
    assert r.n_steps == 24
    assert_same(full, weights(r))
    assert json.loads(state.read_text())["data"]["n_rows"] == 6000  # rewritten with one


def test_bare_arrays_and_tensors_are_taken_as_sources():
    x = data()
    want = weights(train_saes(ArraySource(x), [cfg()], progress=False)[0])
    for bare in (x, torch.from_numpy(x)):
        assert_same(want, weights(train_saes(bare, [cfg()], progress=False)[0]))
    with pytest.raises(
        TypeError,
        match=r"train_saes: source: got list, expected an "
        r"ActivationSource .*ArraySource\(x\)",
    ):
        train_saes(x.tolist(), [cfg()], progress=False)
    with pytest.raises(TypeError, match="SliceSource: got dict"):
        SliceSource({}, 0, 1)
    assert SliceSource(x, 10, 20).read(0, 2).tolist() == x[10:12].tolist()


def test_batchtopk_inference_threshold_gives_mean_l0_k_on_training_rows():
    """The moving average of per-batch minima still remembers the first batches at the end
    of a short run; the calibrated θ gives the training L0 (k) at inference."""
    from stages.sae.data import sample_rows

    src = ArraySource(data(), chunk_rows=500)
    (r,) = train_saes(src, [cfg(architecture="batchtopk", k=3)], progress=False)
    cal = r.sae.metadata["calibration"]
    rows = torch.from_numpy(sample_rows(src, 65536, 0))  # the trainer's calibration rows
    assert cal["rows"] == len(rows) and cal["threshold"] != cal["ema_threshold"]
    with torch.no_grad():
        l0 = (r.sae.encode(rows) > 0).sum(1).double().mean().item()
    assert l0 == pytest.approx(3, abs=3 / len(rows) + 1e-9)  # (n·k)-th largest, strict >
    assert r.train_l0 == pytest.approx(3, abs=0.01)
