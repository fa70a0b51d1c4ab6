"""Steering vectors from contrastive pairs: mean difference (CAA / diff-in-means) and PCA.

Prompts are tokenised with BOS, right-padded and run in batches with `stop_at_layer`
just past the deepest hook. Right padding needs no attention mask: attention is
causal, so the pad tokens after a prompt never influence its own positions, and every
prompt is read at its own index (its last real token for read_position -1).

Vector convention: `v = mean(act(positive)) - mean(act(negative))`, *not* normalised,
so multiplier 1 adds exactly the natural contrast between the two sides. The PCA
vector is the top principal direction of the pair differences (uncentred, i.e. the
top right-singular vector), signed to agree with the mean difference and scaled to the
mean difference's projection on it, so both methods live on the same scale.

On disk (`save_vector`): `vector.safetensors` (one float32 tensor per hook, key = hook
name) + `meta.json` (model, hooks, method, read position, number of pairs, input
hashes, norm per hook). Never pickle.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from stages.activations import check_hooks, stop_layer
from stages.io import load_safetensors, read_json, write_json
from stages.steering.prompts import ContrastivePair, ReadPosition, SteeringSet

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

METHODS = ("mean_diff", "pca")


# ---------------------------------------------------------------------------- batching


def tokenize(model: HookedTransformer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids per prompt, BOS first (as `model.to_tokens` would give them)."""
    tok = model.tokenizer
    ids = tok(list(prompts), add_special_tokens=False)["input_ids"]
    bos = tok.bos_token_id
    prepend = model.cfg.default_prepend_bos and bos is not None
    return [[bos, *x] if prepend else list(x) for x in ids]


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded LongTensor [B, L] and the lengths [B]."""
    lengths = torch.tensor([len(s) for s in seqs])
    out = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out, lengths


def resolve_positions(lengths: Tensor, read_positions: Sequence[ReadPosition],
                      prompts: Sequence[str] | None = None) -> list[int | str]:  # fmt: skip
    """Each prompt's read index as a non-negative int (or "mean"); errors name the prompt."""
    out: list[int | str] = []
    for i, (n, rp) in enumerate(zip(lengths.tolist(), read_positions, strict=True)):
        if rp == "mean":
            if n < 2:
                raise ValueError(f"prompt {i} {_show(prompts, i)}has no token after BOS")
            out.append("mean")
            continue
        idx = int(rp) + n if int(rp) < 0 else int(rp)
        if not 1 <= idx < n:
            raise ValueError(
                f"read_position {rp} of prompt {i} {_show(prompts, i)}is outside its "
                f"{n} tokens (BOS at 0, expected 1..{n - 1} or -1..-{n - 1})"
            )
        out.append(idx)
    return out


def _show(prompts: Sequence[str] | None, i: int) -> str:
    return f"{prompts[i]!r} " if prompts is not None else ""


@torch.no_grad()
def read_activations(
    model: HookedTransformer,
    prompts: Sequence[str],
    hooks: Sequence[str],
    read_positions: Sequence[ReadPosition] | ReadPosition = -1,
    batch_size: int = 64,
) -> dict[str, Tensor]:
    """Activation of each prompt at its read position, per hook: {hook: [n, d]} float32."""
    hooks = list(hooks)
    check_hooks(model, hooks, "steering.hooks")
    if not prompts:
        raise ValueError("read_activations: no prompts")
    if isinstance(read_positions, int | str):
        read_positions = [read_positions] * len(prompts)
    seqs = tokenize(model, prompts)
    lengths = torch.tensor([len(s) for s in seqs])
    where = resolve_positions(lengths, read_positions, prompts)  # fail before any forward
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    stop = stop_layer(model, hooks)
    captured: dict[str, Tensor] = {}

    def grab(act: Tensor, hook) -> None:
        captured[hook.name] = act

    out: dict[str, list[Tensor]] = {h: [] for h in hooks}
    # sort by length so batches waste little padding; restore the order at the end
    order = sorted(range(len(seqs)), key=lambda i: lengths[i])
    for b0 in range(0, len(order), batch_size):
        idx = order[b0 : b0 + batch_size]
        tokens, lens = pad_right([seqs[i] for i in idx], pad)
        model.run_with_hooks(tokens, fwd_hooks=[(h, grab) for h in hooks], stop_at_layer=stop)
        for h in hooks:
            act = captured[h].float()
            rows = []
            for j, i in enumerate(idx):
                w = where[i]
                rows.append(act[j, 1 : lens[j]].mean(0) if w == "mean" else act[j, w])
            out[h].append(torch.stack(rows))
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return {h: torch.cat(v)[inverse] for h, v in out.items()}


# ---------------------------------------------------------------------------- vectors


def mean_diff(pos: Tensor, neg: Tensor) -> Tensor:
    """mean(pos) - mean(neg) over rows (float32)."""
    return (pos.double().mean(0) - neg.double().mean(0)).float()


def pca_direction(diffs: Tensor, reference: Tensor | None = None) -> Tensor:
    """Top right-singular vector of the pair differences [n, d] (uncentred), unit norm,
    signed to agree with `reference` (default: the mean difference)."""
    ref = diffs.double().mean(0) if reference is None else reference.double()
    _, _, vh = torch.linalg.svd(diffs.double(), full_matrices=False)
    u = vh[0]
    return (u if float(u @ ref) >= 0 else -u).float()


def vector_from_acts(pos: Tensor, neg: Tensor, method: str = "mean_diff") -> Tensor:
    if method not in METHODS:
        raise ValueError(f"steering method = {method!r}, expected one of {METHODS}")
    md = mean_diff(pos, neg)
    if method == "mean_diff":
        return md
    u = pca_direction(pos - neg, md)
    return u * float(u @ md)  # on the mean difference's scale


def compute_vectors(
    model: HookedTransformer,
    pairs: Sequence[ContrastivePair] | SteeringSet,
    hooks: Sequence[str],
    method: str = "mean_diff",
    read_position: ReadPosition | None = None,
    batch_size: int = 64,
    *,
    allow_heldout: bool = False,
) -> dict[str, Tensor]:
    """One vector per hook from the pairs. `read_position` overrides every pair's own.

    Vectors are built from training pairs: a `SteeringSet` stands for its `train_pairs`,
    and a held-out pair (`split == "heldout"`) is refused unless `allow_heldout=True`
    (e.g. a vector from the held-out pairs alone, to check that both halves agree).
    """
    if isinstance(pairs, SteeringSet):
        pairs = pairs.train_pairs
    if method not in METHODS:
        raise ValueError(f"steering method = {method!r}, expected one of {METHODS}")
    if not pairs:
        raise ValueError("compute_vectors: empty set of pairs; expected at least one pair")
    heldout = [i for i, p in enumerate(pairs) if p.split == "heldout"]
    if heldout and not allow_heldout:
        p = pairs[heldout[0]]
        raise ValueError(
            f"compute_vectors: {len(heldout)} of {len(pairs)} pairs are held out (pair "
            f"{heldout[0]}: {p.positive!r} / {p.negative!r} has split 'heldout'); expected "
            "training pairs (pass set.train_pairs, or allow_heldout=True on purpose)"
        )
    check_hooks(model, list(hooks), "steering.hooks")
    rps = [p.read_position if read_position is None else read_position for p in pairs]
    acts = read_activations(model, [p.positive for p in pairs] + [p.negative for p in pairs],
                            hooks, rps + rps, batch_size)  # fmt: skip
    n = len(pairs)
    return {h: vector_from_acts(a[:n], a[n:], method) for h, a in acts.items()}


def pairs_hash(pairs: Sequence[ContrastivePair]) -> str:
    h = hashlib.sha256()
    for p in pairs:
        h.update(repr((p.positive, p.negative, p.read_position)).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------- on disk


def save_vector(folder: Path, vectors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Write `vector.safetensors` + `meta.json` into `folder` (norm per hook added)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {h: v.detach().float().contiguous() for h, v in vectors.items()}
    save_file(tensors, folder / "vector.safetensors")
    meta = {**meta, "hooks": list(tensors),
            "norm": {h: float(v.norm()) for h, v in tensors.items()}}  # fmt: skip
    write_json(folder / "meta.json", meta)


def load_vector(folder: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    folder = Path(folder)
    path = folder / "vector.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; expected a steering vector folder")
    return load_safetensors(path, "steering vectors"), read_json(
        folder / "meta.json", "the steering vector's meta"
    )
