import json

import pytest
import torch

sae_lens = pytest.importorskip("sae_lens")

from stages.sae import build_sae, load_sae, save_sae  # noqa: E402
from stages.sae.io import SAEFormatError, load_log_feature_density, load_pretrained_sae  # noqa: E402

D_IN, D_SAE = 10, 24
ARCHS = {
    "relu": {"l1_coefficient": 1.0},
    "topk": {"k": 4},
    "batchtopk": {"k": 4},
    "jumprelu": {"l0_coefficient": 0.1},
    "gated": {"l1_coefficient": 0.1},
}


def trained_like(arch):
    """An SAE with random (non-initial) weights, as training would leave it."""
    sae = build_sae(
        {
            "architecture": arch,
            "d_in": D_IN,
            "d_sae": D_SAE,
            "n_training_tokens": 4096,
            **ARCHS[arch],
        }
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sae.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(D_SAE, generator=g) * 0.3 + 0.05)
        if arch == "batchtopk":
            sae.threshold.fill_(0.2)
    return sae.eval()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_saelens_loads_our_folder_and_reproduces_encode_decode(tmp_path, arch):
    sae = trained_like(arch)
    density = torch.log10(torch.rand(D_SAE) + 1e-3)
    save_sae(
        tmp_path,
        sae,
        hook_name="blocks.0.hook_resid_post",
        model_name="toy",
        log_feature_density=density,
        metrics={"fvu": 0.1, "nan": float("nan")},
    )
    assert {p.name for p in tmp_path.iterdir()} == {
        "cfg.json",
        "sae_weights.safetensors",
        "sparsity.safetensors",
        "metrics.json",
        "checksums.json",  # ours: sha256 of the weight files, checked on load
    }
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    x = torch.randn(50, D_IN) * 2
    with torch.no_grad():
        f_ours, f_theirs = sae.encode(x), theirs.encode(x)
        assert torch.allclose(f_ours, f_theirs, atol=1e-5)
        assert (f_ours > 0).sum() > 0
        assert torch.allclose(sae.decode(f_ours), theirs.decode(f_theirs), atol=1e-5)
    assert theirs.cfg.metadata.hook_name == "blocks.0.hook_resid_post"
    assert json.loads((tmp_path / "metrics.json").read_text())["nan"] is None  # strict JSON
    assert torch.equal(load_log_feature_density(tmp_path), density)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_our_loader_round_trips(tmp_path, arch):
    sae = trained_like(arch)
    save_sae(tmp_path, sae, hook_name="h")
    back = load_sae(tmp_path)
    assert back.architecture == arch
    assert back.apply_b_dec_to_input == sae.apply_b_dec_to_input
    x = torch.randn(40, D_IN)
    with torch.no_grad():
        assert torch.allclose(back.decode(back.encode(x)), sae.decode(sae.encode(x)), atol=1e-6)
    assert back.metadata["hook_name"] == "h"


@pytest.mark.parametrize(
    "arch,extra",
    [
        ("standard", {}),
        ("topk", {"k": 3, "rescale_acts_by_decoder_norm": True}),
        ("jumprelu", {}),
        ("gated", {}),
    ],
)
def test_reading_a_folder_written_by_saelens(tmp_path, arch, extra):
    from sae_lens.registry import get_sae_class

    cls, cfg_cls = get_sae_class(arch)
    theirs = cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, **extra))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        if arch == "jumprelu":
            theirs.threshold.abs_()
    theirs.save_model(tmp_path)
    ours = load_sae(tmp_path)
    x = torch.randn(30, D_IN)
    with torch.no_grad():
        assert torch.allclose(ours.decode(ours.encode(x)), theirs(x), atol=1e-5)


def test_bad_folders_are_named(tmp_path):
    with pytest.raises(SAEFormatError, match="cfg.json: missing"):
        load_sae(tmp_path)
    save_sae(tmp_path, trained_like("topk"), hook_name="h")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["normalize_activations"] = "layer_norm"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFormatError, match="normalize_activations = 'layer_norm'"):
        load_sae(tmp_path)
    cfg["normalize_activations"] = "none"
    cfg["d_sae"] = 99
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"'W_dec' has shape \(24, 10\), expected \(99, 10\)"):
        load_sae(tmp_path)


def test_pretrained_offline_says_what_it_needed(monkeypatch, tmp_path):
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConnectionError, match=r"jbloom/GPT2-Small-SAEs-Reformatted.*huggingface"):
        load_pretrained_sae("gpt2-small-res-jb", "blocks.0.hook_resid_pre")
    with pytest.raises(SAEFormatError, match="not in SAELens' pretrained SAE registry"):
        load_pretrained_sae("no-such-release", "x")


def test_truncated_weights_are_named(tmp_path):
    from stages.io import CorruptArtifactError

    save_sae(tmp_path, trained_like("topk"), hook_name="h")
    weights = tmp_path / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CorruptArtifactError, match=rf"^{weights}: not a readable safetensors"):
        load_sae(tmp_path)


def _flip_payload_bit(path) -> None:
    """Flip one bit of the tensor bytes (past the JSON header): still a valid file."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header + (len(data) - header) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def test_flipped_bits_in_the_weights_are_refused_by_their_checksum(tmp_path):
    """Issue 20 item 4: flipped bits in the payload loaded without error before."""
    sae = trained_like("topk")
    save_sae(tmp_path, sae, hook_name="h")
    sae_lens.SAE.load_from_disk(tmp_path)  # our extra file does not bother SAELens
    weights = tmp_path / "sae_weights.safetensors"
    _flip_payload_bit(weights)
    with pytest.raises(SAEFormatError) as e:
        load_sae(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{weights}: sha256 ")
    assert "checksums.json" in msg


def test_non_finite_weights_are_refused_even_with_a_matching_checksum(tmp_path):
    from safetensors.torch import load_file, save_file

    sae = trained_like("relu")
    save_sae(tmp_path, sae, hook_name="h")
    weights = tmp_path / "sae_weights.safetensors"
    state = load_file(weights)
    state["W_dec"][3, 2] = float("inf")  # e.g. a flipped exponent bit, then re-saved
    save_file(state, weights)
    (tmp_path / "checksums.json").unlink()  # as a published SAELens folder: no checksum
    with pytest.raises(SAEFormatError) as e:
        load_sae(tmp_path)
    assert str(e.value).startswith(
        f"{weights}: tensor 'W_dec' holds a non-finite value (inf at [3, 2])"
    )
