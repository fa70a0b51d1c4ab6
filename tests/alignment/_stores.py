"""Tiny activation stores on disk, in the layout of `stages/activations/`, and tiny SAEs.

The stores are real zarr groups read back through `ActivationStore`, so the alignment
code under test reads them exactly as it reads a cached model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import zarr

from stages.activations import ActivationStore
from stages.sae import build_sae
from stages.sae.base import BaseSAE


def write_store(
    path: Path,
    acts: dict[str, np.ndarray],
    *,
    doc_ids: np.ndarray,
    char_end: np.ndarray,
    char_start: np.ndarray | None = None,
    token_ids: np.ndarray | None = None,
    heldout_start: int | None = None,
    concept_labels: np.ndarray | None = None,
    concept_names: list[str] | None = None,
    corpus_hash: str = "corpus-0",
    chunk_rows: int = 64,
    model: str = "m",
) -> ActivationStore:
    n = len(doc_ids)
    group = zarr.open_group(path, mode="w")
    meta = {
        "token_ids": np.arange(n) % 97 if token_ids is None else token_ids,
        "doc_ids": doc_ids,
        "positions": np.arange(n) % 31 + 1,
        "char_start": np.maximum(np.asarray(char_end) - 1, 0) if char_start is None else char_start,
        "char_end": char_end,
        "split": np.zeros(n),
    }
    heldout_start = n if heldout_start is None else heldout_start
    meta["split"][heldout_start:] = 1
    dtypes = {"token_ids": np.int32, "doc_ids": np.int32, "positions": np.int16,
              "char_start": np.int32, "char_end": np.int32, "split": np.uint8}  # fmt: skip
    for name, values in meta.items():
        arr = group.create_array(name, shape=(n,), chunks=(chunk_rows,), dtype=dtypes[name])
        arr[:] = np.asarray(values).astype(dtypes[name])
    for hook, x in acts.items():
        arr = group.create_array(hook, shape=x.shape, chunks=(chunk_rows, x.shape[1]),
                                 dtype=np.float16)  # fmt: skip
        arr[:] = x.astype(np.float16)
    if concept_labels is not None:
        arr = group.create_array("concept_labels", shape=concept_labels.shape,
                                 chunks=(chunk_rows, concept_labels.shape[1]), dtype=np.uint8)  # fmt: skip
        arr[:] = concept_labels
    group.attrs.update(
        {
            "model": model,
            "hooks": list(acts),
            "n_rows": n,
            "heldout_start": heldout_start,
            "seq_len": 32,
            "corpus_hash": corpus_hash,
            "concept_names": concept_names or [],
            "bos_id": 0,
        }
    )
    return ActivationStore(path)


def tiny_topk_sae(d_in: int, d_sae: int, k: int, seed: int = 0) -> BaseSAE:
    """A TopK SAE with random unit-norm decoder rows and encoder = decoder transpose."""
    sae = build_sae({"architecture": "topk", "d_in": d_in, "d_sae": d_sae, "k": k,
                     "n_training_tokens": 4096, "batch_size": 64, "seed": seed})  # fmt: skip
    sae.eval()
    return sae


def permuted_copy(sae: BaseSAE, perm: np.ndarray) -> BaseSAE:
    """B = A with its latents reordered: B's latent j is A's latent perm[j]."""
    copy = tiny_topk_sae(sae.d_in, sae.d_sae, sae.cfg.k)  # type: ignore[attr-defined]
    p = torch.as_tensor(perm)
    with torch.no_grad():
        copy.W_enc.copy_(sae.W_enc[:, p])
        copy.W_dec.copy_(sae.W_dec[p])
        copy.b_enc.copy_(sae.b_enc[p])
        copy.b_dec.copy_(sae.b_dec)
    return copy
