"""Toy LM training is bit-reproducible with several torch threads.

On the CPU the backward of an embedding lookup `W_E[tokens]` (`index_put_` with
accumulate) adds rows from several threads with atomics, so without torch's
deterministic algorithms the gradient's last bits, and then the weights, differ run to
run (`stages.compute.deterministic_algorithms`, used by `train_toy_model`)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from stages.compute import deterministic_algorithms


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _md5(tensors) -> str:
    return hashlib.md5(b"".join(t.detach().numpy().tobytes() for t in tensors)).hexdigest()


def test_embedding_backward_is_deterministic_inside_the_block(two_threads):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2000, 128, generator=gen, requires_grad=True)
    idx = torch.randint(0, 2000, (32, 128), generator=gen)
    g = torch.randn(32, 128, 128, generator=gen)

    def grad() -> str:
        w.grad = None
        (w[idx] * g).sum().backward()
        return _md5([w.grad])

    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_algorithms():
        assert torch.are_deterministic_algorithms_enabled()
        assert len({grad() for _ in range(10)}) == 1
    assert not torch.are_deterministic_algorithms_enabled()  # restored


@pytest.mark.parametrize("positional", ["standard", "rotary"])
def test_toy_lm_training_twice_gives_the_same_weights(
    two_threads, tmp_path, toy_windows, positional
):
    from stages.config import ToyModel
    from stages.models import build_toy_model, train_toy_model

    tok, train, held = toy_windows
    m = ToyModel.model_validate({
        "source": "toy", "tokenizer": {"vocab_size": 1000},
        "train": {"seq_len": 64, "batch_size": 32, "tokens": 32 * 63 * 12, "warmup_steps": 2},
        "arch": {"n_layers": 2, "d_model": 64, "n_heads": 4, "d_mlp": 128, "n_ctx": 64,
                 "positional": positional}})  # fmt: skip
    # train.tokens 0: an untrained control, exactly the initialisation, scored as it is
    untrained = m.model_copy(update={"train": m.train.model_copy(update={"tokens": 0})})
    model = build_toy_model(untrained, tok)
    init = _md5(model.state_dict().values())
    result = train_toy_model(model, untrained, train, held)
    assert result.steps == 0 and result.tokens_seen == 0 and result.loss_curve == []
    assert _md5(model.state_dict().values()) == init and result.heldout_loss > 6.0
    runs = []
    for _ in range(2):
        model = build_toy_model(m, tok)
        result = train_toy_model(model, m, train, held)
        runs.append((_md5(model.state_dict().values()), result.heldout_loss))
    curve = dict(result.loss_curve)
    assert result.steps == 12 and curve[11] < curve[0] - 1.5  # it learned something
    assert runs[0] == runs[1]
    # the block turns torch's NaN-filling of new tensors off (speed only): with it on,
    # every new tensor starts as NaN, and training still gives the same bits
    import torch.utils.deterministic as det

    from stages.models import _train_toy_model

    assert det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    try:
        model = build_toy_model(m, tok)
        filled = _train_toy_model(model, m, train, held, None, 50)
    finally:
        torch.use_deterministic_algorithms(False)
    assert (_md5(model.state_dict().values()), filled.heldout_loss) == runs[0]
    assert not torch.are_deterministic_algorithms_enabled()
    # rotary: relative positions on queries and keys, no learned position table
    assert ("hook_pos_embed" in model.hook_dict) == (positional == "standard")
    # the saved model loads back as it was (its config rebuilt from config.json)
    from stages.models import load_model, save_toy_model

    out = tmp_path / "saved"
    out.mkdir()
    save_toy_model(model, m, tmp_path / "tok", out)
    again = load_model(out)
    window = torch.as_tensor(train.tokens[:2]).long()
    assert torch.equal(model(window), again(window))
