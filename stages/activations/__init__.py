"""The activation store: one sharded zarr group per model.

Layout of `data/activations/<model>/` (the one source of truth for it; read it with
`ActivationStore`):

    <hook>            float16 [n_rows, d]   one array per hook, e.g. blocks.1.hook_resid_post
    token_ids         int32   [n_rows]
    doc_ids           int32   [n_rows]      corpus document id
    positions         int16   [n_rows]      position in the context window (1 .. seq_len-1)
    char_start        int32   [n_rows]      character span of the token in its document
    char_end          int32   [n_rows]      (empty span for the separator opening a document)
    split             uint8   [n_rows]      0 = train, 1 = held-out (held-out rows form the tail)
    concept_labels    uint8   [n_rows, n_concepts]   1 where the token overlaps a labelled span
                                            (absent when the corpus has no labels)

Rows are windows of `seq_len` tokens packed by the rule in `stages/tokens.py`, minus
the BOS at position 0. Group attributes hold the model, hooks, dtype, corpus hash,
params, `heldout_start`, `seq_len`, `bos_id` and `concept_names`.

Arrays are sharded (`shard_rows` rows per file) so a store has tens of files, and
every chunk carries a CRC32C checksum so a flipped byte is detected on read. zarr reads
a shard file that is not there as zeros (fill_value), so the finished store lists every
file it wrote with its size in `manifest.json`, and `ActivationStore` refuses a store
whose listed files are missing, empty or of another size, naming the file.

Caching is resumable: rows are written shard by shard into `<out>.partial/`, a
marker file per shard (`done/<i>`) records the shards that are complete, and a re-run
after `kill -9` continues from there. Shards are independent, so Dask workers can fill
disjoint runs of them at once (`prepare_cache` → `cache_shards` per run → `finish_cache`).
Forward batches are aligned to the same window boundaries on resume, so the result is
identical, array for array, to an uninterrupted run. The folder is renamed into place
only when complete.

In object storage (`activations.store.url`, e.g. `s3://bucket/atlas/activations`)
nothing is renamed: the store is written in place at `<url>/<model>/<fingerprint[:16]>/`,
content-addressed by its inputs, with the same markers beside it. When every shard is
marked, `complete.json` is written there (then the markers are removed), and `<out>/`
becomes a small pointer folder, `remote.json` (URL, fingerprint, rows, hooks and every
remote file's size and ETag), which is what DVC tracks. `ActivationStore(<out>)` follows
the pointer, refusing a remote store that is gone, incomplete or differs from the
pointer's manifest. Same inputs ⇒ same URL, so a re-run resumes or finds it complete;
an old store is never overwritten or deleted. The remote bytes equal a local store's.

Modules: `reader` (`ActivationStore`, `ActivationSource`, `read_rows`), `writer` (the
resumable cache: `prepare_cache`, `cache_shards`, `finish_cache`, `cache_activations`),
`budget` (disk, memory and time a store needs, checked before caching),
`storage` (local or object storage: URL check, manifests, pointers), `labels`
(`token_concept_labels`), `hooks` (`check_hooks`, `stop_layer` on a loaded model),
`hook_names` (which hook names can be cached, their layer and width, no model needed)
and `config` (the `activations` section of params.yaml). Every name is importable from
`stages.activations`.
"""

from __future__ import annotations

from stages.lazy import lazy_exports

# Names exported here, by the submodule defining them; each is imported on first use
# (PEP 562), so that a reader of stores (alignment, steering) does not run, and make a
# DVC stage depend on, the writer.
_EXPORTS = {
    "budget": (
        "BudgetError StoreBudget check_budget forward_flops_per_token plan_store record_rate"
    ),
    "config": "ActivationParams StoreParams",
    "hook_names": "check_hook_name hook_layer hook_width",
    "hooks": "check_hooks stop_layer",
    "labels": "token_concept_labels",
    "reader": "ActivationSource ActivationStore read_rows",
    "storage": (
        "COMPLETE DONE MANIFEST META_ARRAYS POINTER PROGRESS CorruptStoreError StoreURLError "
        "check_files check_store_url count_files remote_manifest write_manifest"
    ),
    "writer": (
        "CacheInputs CachePlan cache_activations cache_inputs cache_shards finish_cache "
        "prepare_cache shard_runs store_budget summarize_cache"
    ),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
