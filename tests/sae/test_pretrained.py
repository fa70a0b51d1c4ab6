"""Pretrained SAEs named in params.yaml (`saes.pretrained`): the schema's one-line errors,
the other sections accepting their names, and `resolve_pretrained_sae` on both sources
(SAELens' registry read from an HF cache, and a local folder)."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("sae_lens")

from stages.config import ParamsError, parse_params  # noqa: E402
from stages.sae.config import PretrainedSAE  # noqa: E402
from stages.sae.io import SAEFormatError, load_sae, resolve_pretrained_sae  # noqa: E402
from tests.backbone import _fake_hf_cache  # noqa: E402
from tests.backbone.conftest import TINY  # noqa: E402

HOOK = "blocks.0.hook_resid_post"  # cached by tiny-a, 32 wide


def with_pretrained(entries: dict, **sections) -> dict:
    raw = copy.deepcopy(TINY)
    raw["saes"]["pretrained"] = entries
    raw.update(sections)
    return raw


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"tiny-a": {"jb": {"hook": HOOK}}},
         "saes.pretrained.tiny-a.jb: expected a source: release + sae_id"),
        ({"tiny-a": {"jb": {"hook": HOOK, "release": "gpt2-small-res-jb"}}},
         "saes.pretrained.tiny-a.jb.sae_id is missing, expected it beside release"),
        ({"tiny-a": {"jb": {"hook": HOOK, "release": "r", "sae_id": "i", "path": "p"}}},
         "saes.pretrained.tiny-a.jb.path = 'p', expected either path or release + sae_id"),
        ({"tiny-a": {"jb": {"hook": "blocks.1.hook_resid_post", "release": "r", "sae_id": "i"}}},
         "saes.pretrained.tiny-a.jb.hook = 'blocks.1.hook_resid_post', expected a cached hook of tiny-a"),
        ({"gpt2": {"jb": {"hook": HOOK, "release": "r", "sae_id": "i"}}},
         "saes.pretrained.gpt2 = 'gpt2', expected a model listed under models (tiny-a, tiny-b)"),
        ({"tiny-a": {"topk-128-k4": {"hook": HOOK, "release": "r", "sae_id": "i"}}},
         "saes.pretrained.tiny-a.topk-128-k4 = 'topk-128-k4', expected a name no SAE of saes.sweep.tiny-a trains on"),
        ({"tiny-a": {"jb": {"hook": HOOK, "path": "no/such/folder"}}},
         "saes.pretrained.tiny-a.jb.path = 'no/such/folder', expected a SAELens-format folder holding cfg.json"),
        ({"tiny-a": {"jb": {"hook": HOOK, "release": "r", "sae_id": "i", "width": 4}}},
         "saes.pretrained.tiny-a.jb.width"),
    ],
)  # fmt: skip
def test_bad_entries_are_named_in_one_line(entries, message):
    with pytest.raises(ParamsError) as e:
        parse_params(with_pretrained(entries))
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_its_name_is_an_sae_for_steering_alignment_and_dashboards():
    raw = with_pretrained({m: {"jb": {"hook": HOOK, "release": "r", "sae_id": "i"}}
                           for m in ("tiny-a", "tiny-b")})  # fmt: skip
    raw["steering"]["models"]["tiny-a"]["saes"] = {HOOK: "jb"}
    raw["align"]["config"]["sae_names"] = ["jb"]
    raw["report"]["dashboard_saes"] = ["tiny-a/blocks.0.hook_resid_post/jb"]
    p = parse_params(raw)
    assert p.sae_folders("tiny-a")[HOOK][-1] == "jb"
    assert p.sae_plan("tiny-a")[HOOK][-1].architecture == "relu"  # nothing pretrained is trained
    # without the entry, the same names are refused
    raw["saes"]["pretrained"] = {}
    with pytest.raises(
        ParamsError, match="steering.models.tiny-a.saes.blocks.0.hook_resid_post = 'jb'"
    ):
        parse_params(raw)


def _folder(tmp_path, hook=HOOK, d_in=32):
    from stages.sae import build_sae, save_sae

    torch.manual_seed(0)
    sae = build_sae({"architecture": "topk", "k": 4, "d_in": d_in, "d_sae": 64,
                     "n_training_tokens": 4096, "batch_size": 4096})  # fmt: skip
    return save_sae(tmp_path / "sae", sae, hook_name=hook, model_name="elsewhere")


def test_a_local_folder_resolves_to_its_weights(tmp_path):
    folder = _folder(tmp_path)
    sae = resolve_pretrained_sae(PretrainedSAE(hook=HOOK, path=str(folder)), "here", d_in=32)
    assert torch.equal(sae.W_dec, load_sae(folder).W_dec) and sae.architecture == "topk"
    assert sae.metadata["pretrained"] == {"hook": HOOK, "path": str(folder)}
    assert sae.metadata["trained_as"]["model_name"] == "elsewhere"


def test_a_local_folder_of_another_hook_or_width_is_refused(tmp_path):
    folder = _folder(tmp_path)
    where = "params.yaml: saes.pretrained.tiny-a.jb"
    with pytest.raises(SAEFormatError, match=rf"^{where}.hook = 'blocks.1.hook_resid_post', "
                       rf"but folder .* was trained on '{HOOK}'"):  # fmt: skip
        resolve_pretrained_sae(
            PretrainedSAE(hook="blocks.1.hook_resid_post", path=str(folder)), where
        )
    with pytest.raises(
        SAEFormatError, match=rf"^{where}: folder .* reads d_in = 32, but {HOOK} is 48 wide"
    ):
        resolve_pretrained_sae(PretrainedSAE(hook=HOOK, path=str(folder)), where, d_in=48)
    with pytest.raises(SAEFormatError, match=rf"^{where}: .*cfg.json: missing"):
        resolve_pretrained_sae(PretrainedSAE(hook=HOOK, path=str(tmp_path)), where)


def _offline_cache(monkeypatch, hf_home):
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(hf_home / "hub"))


def test_a_release_resolves_from_the_hf_cache_through_saelens(monkeypatch, tmp_path):
    hook = "blocks.1.hook_resid_pre"
    folder = _fake_hf_cache.add_sae_release(tmp_path, "gpt2-small-res-jb", hook, d_in=32,
                                            d_sae=48, hook=hook)  # fmt: skip
    assert folder.parts[-4:-1] == ("models--jbloom--GPT2-Small-SAEs-Reformatted", "snapshots",
                                   _fake_hf_cache.COMMIT)  # fmt: skip
    _offline_cache(monkeypatch, tmp_path)
    entry = PretrainedSAE(hook=hook, release="gpt2-small-res-jb", sae_id=hook)
    sae = resolve_pretrained_sae(entry, "here", d_in=32)
    assert sae.architecture == "relu" and torch.equal(sae.W_enc, load_sae(folder).W_enc)


def test_without_hub_or_cache_the_message_names_what_was_needed(monkeypatch, tmp_path):
    _offline_cache(monkeypatch, tmp_path)
    hook = "blocks.8.hook_resid_pre"
    entry = PretrainedSAE(hook=hook, release="gpt2-small-res-jb", sae_id=hook)
    with pytest.raises(ConnectionError) as e:
        resolve_pretrained_sae(entry, "params.yaml: saes.pretrained.gpt2.res")
    msg = str(e.value)
    assert msg.startswith("params.yaml: saes.pretrained.gpt2.res: could not load pretrained SAE "
                          "gpt2-small-res-jb/blocks.8.hook_resid_pre")  # fmt: skip
    assert "'jbloom/GPT2-Small-SAEs-Reformatted'" in msg and "\n" not in msg
