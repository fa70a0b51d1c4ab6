"""Vectors, hooks, evaluation and errors on a tiny real HookedTransformer."""

from __future__ import annotations

import json

import pytest
import torch

from stages.steering import (
    ContrastivePair,
    EvalPrompt,
    SteeringSet,
    compute_vectors,
    generate_steered,
    load_vector,
    read_set,
    read_sets,
    save_vector,
    steering_hooks,
    toy_sets,
)
from stages.steering.evaluate import metric_grid, side_effects, steerability, target_masks
from stages.steering.prompts import target_ids, write_set
from stages.steering.vectors import read_activations
from tests.steering.conftest import HOOKS

PROMPTS = ["Tom sees the dog", "On Monday the weather is sunny, so Anna feels", "The cat",
           "Three brown owls fly over the park and Mia is happy"]  # fmt: skip


def test_batched_reads_equal_one_by_one(tiny_model):
    batched = read_activations(tiny_model, PROMPTS, HOOKS, -1, batch_size=3)
    for i, p in enumerate(PROMPTS):
        _, cache = tiny_model.run_with_cache(tiny_model.to_tokens(p))
        for h in HOOKS:
            assert torch.allclose(batched[h][i], cache[h][0, -1], atol=1e-5)
    mean = read_activations(tiny_model, PROMPTS[:1], HOOKS[:1], "mean")[HOOKS[0]][0]
    _, cache = tiny_model.run_with_cache(tiny_model.to_tokens(PROMPTS[0]))
    assert torch.allclose(mean, cache[HOOKS[0]][0, 1:].mean(0), atol=1e-5)


def test_mean_diff_vector_matches_cache(tiny_model):
    pairs = [ContrastivePair(PROMPTS[0], PROMPTS[2], 2), ContrastivePair(PROMPTS[1], PROMPTS[3])]
    v = compute_vectors(tiny_model, pairs, HOOKS, batch_size=2)
    h = HOOKS[1]
    acts = {p: tiny_model.run_with_cache(tiny_model.to_tokens(p))[1][h][0] for p in PROMPTS}
    want = (acts[PROMPTS[0]][2] + acts[PROMPTS[1]][-1] - acts[PROMPTS[2]][2]
            - acts[PROMPTS[3]][-1]) / 2  # fmt: skip
    assert torch.allclose(v[h], want, atol=1e-5)


def test_read_position_past_the_prompt_is_an_error(tiny_model):
    pairs = [ContrastivePair("The cat", "The dog", 40)]
    with pytest.raises(ValueError, match="read_position 40 of prompt 0 'The cat'"):
        compute_vectors(tiny_model, pairs, HOOKS)
    with pytest.raises(ValueError, match="BOS at 0"):
        compute_vectors(tiny_model, [ContrastivePair("The cat", "The dog", 0)], HOOKS)


def test_empty_set_and_unknown_hook_fail_before_work(tiny_model):
    with pytest.raises(ValueError, match="empty set of pairs"):
        compute_vectors(tiny_model, [], HOOKS)
    with pytest.raises(ValueError, match=r"blocks\.7\.hook_resid_post.*expected a hook"):
        compute_vectors(tiny_model, [ContrastivePair("a", "b")], ["blocks.7.hook_resid_post"])


def test_multiplier_zero_gives_clean_logits_exactly(tiny_model):
    tokens = tiny_model.to_tokens(PROMPTS[1])
    v = torch.randn(32)
    clean = tiny_model(tokens)
    for mode in ("add", "ablate_add"):
        with tiny_model.hooks(fwd_hooks=steering_hooks(HOOKS[0], v, 0.0, "all", "add")):
            assert torch.equal(tiny_model(tokens), clean), mode
    steered = tiny_model.run_with_hooks(tokens, fwd_hooks=steering_hooks(HOOKS[0], v, 3.0))
    assert not torch.allclose(steered, clean)
    assert torch.allclose(steered[0, 0], clean[0, 0])  # BOS never steered


def test_generation_with_hooks(tiny_model):
    v = torch.randn(32) * 10
    plain = tiny_model.generate("Tom sees", max_new_tokens=5, do_sample=False,
                                use_past_kv_cache=False, verbose=False, stop_at_eos=False)  # fmt: skip
    zero = generate_steered(tiny_model, ["Tom sees"], HOOKS[0], v, 0.0, max_new_tokens=5)
    assert zero == [plain]
    strong = generate_steered(tiny_model, ["Tom sees"], HOOKS[0], v, 8.0, max_new_tokens=5)
    assert strong[0].startswith("Tom sees") and strong != zero


def _tiny_set() -> SteeringSet:
    return SteeringSet("t", [ContrastivePair("Tom feels happy", "Tom feels sad")],
                       [EvalPrompt("Anna feels"), EvalPrompt("Ben feels")],
                       ["happy", "glad"], ["sad", "angry"])  # fmt: skip


def test_steerability_of_the_unembedding_direction(tiny_model):
    """Adding the direction W_U[:, pos] − W_U[:, neg] at the last hook raises the metric
    monotonically (it acts on the logits through ln_final only)."""
    s = _tiny_set()
    tok = tiny_model.tokenizer
    pos, neg = target_ids(tok, s.positive_targets), target_ids(tok, s.negative_targets)
    W = tiny_model.W_U
    v = W[:, pos].mean(1) - W[:, neg].mean(1)
    st = steerability(tiny_model, s, HOOKS[1], v, [-2, -1, 0, 1, 2])
    assert st.slope > 0 and st.wrong_way_fraction == 0.0
    grid = metric_grid(tiny_model, s, HOOKS[1], v, [-2, -1, 0, 1, 2], batch_size=3)
    assert torch.all(grid.diff(dim=1) > 0)
    # the multiplier-0 column equals the unsteered metric
    clean = metric_grid(tiny_model, s, None, None, [0.0])
    assert torch.allclose(grid[:, 2], clean[:, 0], atol=1e-6)


def test_metric_grid_equals_full_forward_log_odds(tiny_model):
    """The grid reads only last positions (ln_final + unembed on those rows alone) and
    skips the softmax normaliser; it must equal log-odds from a full steered forward."""
    from stages.steering.apply import steering_hooks
    from stages.steering.vectors import tokenize

    s = _tiny_set()
    v = torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(3))
    mults = [-2.0, 0.5, 3.0]
    grid = metric_grid(tiny_model, s, HOOKS[0], v, mults, batch_size=4)
    pos, neg = target_masks(tiny_model, s)
    for i, toks in enumerate(tokenize(tiny_model, [e.prompt for e in s.eval_prompts])):
        for j, m in enumerate(mults):
            hooks = steering_hooks(HOOKS[0], v, m, positions="last")
            with torch.no_grad(), tiny_model.hooks(fwd_hooks=hooks):
                lp = tiny_model(torch.tensor([toks]))[0, -1].double().log_softmax(-1)
            want = lp[pos[i]].logsumexp(0) - lp[neg[i]].logsumexp(0)
            assert float(grid[i, j]) == pytest.approx(float(want), abs=1e-4)


def test_side_effects_zero_at_zero(tiny_model, tiny_store):
    tokens = tiny_store.windows("heldout", max_windows=4)
    v = torch.randn(32)
    se0 = side_effects(tiny_model, HOOKS[0], v, 0.0, tokens)
    assert se0.kl == 0.0 and se0.ce_rise == 0.0
    se = side_effects(tiny_model, HOOKS[0], v, 4.0, tokens)
    assert se.kl > 0 and se.n_predictions == 4 * 30


def test_vector_files_roundtrip(tmp_path):
    vecs = {h: torch.arange(4.0) + i for i, h in enumerate(HOOKS)}
    save_vector(tmp_path, vecs, {"model": "m", "method": "mean_diff"})
    back, meta = load_vector(tmp_path)
    assert set(back) == set(HOOKS) and all(torch.equal(back[h], vecs[h]) for h in HOOKS)
    assert meta["norm"][HOOKS[1]] == pytest.approx(float(vecs[HOOKS[1]].norm()))
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"positive": "a", "negative": "b"}\n\n{"positive": "a", "negative": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 3: not valid JSON"):
        read_set(path)
    path.write_text('{"positive": "a", "negative": "b"}\n{"positive": "a"}\n')
    with pytest.raises(ValueError, match=r"line 2: 'negative' must be a non-empty string"):
        read_set(path)
    path.write_text('{"positive": "a", "negative": "b", "read_position": "last"}\n')
    with pytest.raises(ValueError, match=r"line 1: read_position = 'last', expected"):
        read_set(path)
    path.write_text('{"positive": "a", "negative": "b", "colour": 1}\n')
    with pytest.raises(ValueError, match=r"line 1: unknown key\(s\) \['colour'\]"):
        read_set(path)
    path.write_text('{"kind": "eval", "prompt": "x"}\n')
    with pytest.raises(ValueError, match="no training pairs"):
        read_set(path)


def test_set_files_that_could_not_steer_are_refused(tmp_path):
    path = tmp_path / "s.jsonl"
    pair = '{"positive": "a", "negative": "b"}\n'
    header = '{"kind": "header", "positive_targets": ["x"], "negative_targets": ["y"]}\n'
    path.write_text(header + pair)
    with pytest.raises(ValueError, match=r"s\.jsonl: no eval prompts"):
        read_set(path)
    path.write_text('{"kind": "header", "positive_targets": ["x"]}\n' + pair
                    + '{"kind": "eval", "prompt": "p"}\n')  # fmt: skip
    with pytest.raises(ValueError, match=r"line 3: no negative target words for this prompt"):
        read_set(path)
    path.write_text(header + header + pair)
    with pytest.raises(ValueError, match=r"line 2: a second header \(the first is on line 1\)"):
        read_set(path)
    path.write_text('{"kind": "header", "name": 5}\n' + pair)
    with pytest.raises(ValueError, match=r"line 1: 'name' must be a string, got 5"):
        read_set(path)
    with pytest.raises(FileNotFoundError, match=r"a folder; expected a contrastive set"):
        read_set(tmp_path)
    # an editor's byte-order mark is not an error; per-prompt targets stand in for the header's
    path.write_text("\ufeff" + pair + '{"kind": "eval", "prompt": "p", "positive_targets": '
                    '["x"], "negative_targets": ["y"]}\n', encoding="utf-8")  # fmt: skip
    assert read_set(path).targets_for(read_set(path).eval_prompts[0]) == (["x"], ["y"])
    with pytest.raises(ValueError, match=r"steering\.toy_sets\.n_train = 9999 \+ n_heldout = 4 "
                       r"requested, but the grammar gives 768 \+ 0 pairs"):  # fmt: skip
        toy_sets(0, 9999, 4, ["mammal_vs_bird"])


def test_set_roundtrip_and_shipped_sets(tmp_path):
    s = toy_sets(0, 8, 4)["mammal_vs_bird"]
    write_set(s, tmp_path / "x.jsonl")
    back = read_set(tmp_path / "x.jsonl")
    assert back.pairs == s.pairs and back.eval_prompts == s.eval_prompts
    assert back.content_hash() == s.content_hash()
    shipped = read_sets(__import__("pathlib").Path("data/prompts"))
    assert {"sentiment_actadd", "caa_ab"} <= set(shipped)
    assert all(x.train_pairs and x.eval_prompts for x in shipped.values())
    json.dumps([x.to_dict() for x in shipped.values()])


def test_toy_sets_are_deterministic_and_disjoint(tiny_model):
    a, b = toy_sets(3, 32, 16), toy_sets(3, 32, 16)
    assert all(a[n].content_hash() == b[n].content_hash() for n in a)
    assert (
        toy_sets(4, 32, 16)["emotion_polarity"].content_hash()
        != a["emotion_polarity"].content_hash()
    )
    for s in a.values():
        assert len(s.train_pairs) == 32 and len(s.heldout_pairs) == 16 and s.eval_prompts
        train_text = {t for p in s.train_pairs for t in (p.positive, p.negative)}
        assert not train_text & {t for p in s.heldout_pairs for t in (p.positive, p.negative)}
        assert not train_text & {e.prompt for e in s.eval_prompts}
        pos, neg = target_masks(tiny_model, s)  # shared first tokens dropped
        assert pos.any(1).all() and neg.any(1).all() and not (pos & neg).any()


def test_held_out_pairs_never_reach_a_vector_by_accident(tiny_model):
    s = toy_sets(0, 4, 2, ["emotion_polarity"])["emotion_polarity"]
    want = compute_vectors(tiny_model, s.train_pairs, HOOKS)
    with pytest.raises(ValueError, match="2 of 6 pairs are held out .*allow_heldout=True"):
        compute_vectors(tiny_model, s.pairs, HOOKS)  # train + held out: refused
    # a set stands for its training pairs
    got = compute_vectors(tiny_model, s, HOOKS)
    assert all(torch.equal(got[h], want[h]) for h in HOOKS)
    # on purpose (run_concept's held-out agreement check)
    vh = compute_vectors(tiny_model, s.heldout_pairs, HOOKS, allow_heldout=True)
    assert set(vh) == set(HOOKS) and not torch.equal(vh[HOOKS[0]], want[HOOKS[0]])


def test_shared_target_tokens_are_reported_once_per_set(tiny_model, caplog):
    s = SteeringSet("shared-targets", [ContrastivePair("Tom feels happy", "Tom feels sad")],
                    [EvalPrompt("Anna feels"), EvalPrompt("Ben feels", ["glad", "happy"])],
                    ["happy", "glad"], ["happy", "sad"])  # fmt: skip
    happy = target_ids(tiny_model.tokenizer, ["happy"])
    v = torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    with caplog.at_level("WARNING", logger="stages.steering.evaluate"):
        for hook in HOOKS:  # what run_concept does: one grid per hook and vector
            steerability(tiny_model, s, hook, v, [-1.0, 0.0, 1.0])
            metric_grid(tiny_model, s, hook, None, [0.0])
    shared = [r.getMessage() for r in caplog.records if "share first tokens" in r.getMessage()]
    assert shared == [f"steering set 'shared-targets': targets share first tokens {happy}; "
                      "ignoring them"]  # fmt: skip
    pos, neg = target_masks(tiny_model, s)
    assert not pos[:, happy].any() and not neg[:, happy].any()
