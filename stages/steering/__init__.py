"""Steering vectors: contrastive sets, vectors, hooks, evaluation, SAE decomposition.

A library (no DVC, Prefect or MLflow in here). The pipeline stage calls, per concept::

    from stages.steering import (ConceptConfig, decompose_concept, figures, read_sets,
                                 run_concept, toy_sets, write_concept, write_decomposition)

    sets = toy_sets(seed=0, n_train=64, n_heldout=32)       # toy corpus; or read_sets(Path("data/prompts"))
    store = ActivationStore(Path("data/activations/toy-a"))
    for s in sets.values():                                 # steering@toy-a
        r = run_concept(model, s, hooks, store, ConceptConfig(), model_name="toy-a")
        folder = write_concept(r, Path("data/steering/toy-a"))
        for name, fig in figures(r).items(): ...            # log to MLflow / save
    saes = {"blocks.1.hook_resid_post": load_sae(folder)}  # hook -> SAE (any subset of hooks)
    for s in sets.values():                                 # decompose@toy-a
        dd = decompose_concept(model, s, vectors, evaluation, saes, store, ConceptConfig())
        write_decomposition(dd, Path("data/decomposition/toy-a"), s.name, "toy-a")

Conventions
- Vectors are the raw mean difference mean(act(pos)) − mean(act(neg)) (not unit
  normalised): multiplier 1 adds the natural contrast. PCA vectors are put on the same
  scale (see `vectors.py`).
- Read positions index the tokenised prompt with BOS at 0; -1 = last token; "mean".
- BOS (position 0) is never steered.
- Every result is a dataclass with `to_dict()` (JSON-serialisable).

Modules and public functions (every name below is importable from `stages.steering`)
- `prompts`: `ContrastivePair`, `EvalPrompt`, `SteeringSet`, `read_set(path)`,
  `read_sets(folder)`, `write_set(set, path)`, `toy_sets(seed, n_train, n_heldout)`,
  `target_ids(tokenizer, words, prefix)`. File format: `data/prompts/README.md`.
- `vectors`: `compute_vectors(model, s.train_pairs, hooks, method="mean_diff"|"pca",
  read_position=None, batch_size=64) -> {hook: Tensor}` (training pairs only: a held-out
  pair is refused unless `allow_heldout=True`; a `SteeringSet` stands for its
  `train_pairs`), `read_activations(...)`, `mean_diff`, `pca_direction`,
  `save_vector(folder, vectors, meta)`, `load_vector(folder) -> (vectors, meta)`.
- `apply`: `steering_hooks(hook, vector, multiplier, positions="all"|"last"|[idx],
  mode="add"|"ablate"|"ablate_add") -> fwd_hooks`, `steer(...)`,
  `generate_steered(model, prompts, hook, vector, multiplier, ...) -> [str]`.
- `evaluate`: `behaviour_metric(logits, pos_mask, neg_mask)`, `metric_grid(...)`,
  `steerability(model, set, hook, vector, multipliers) -> Steerability`,
  `side_effects(model, hook, vector, multiplier, tokens) -> SideEffects`,
  `layer_sweep(model, set, vectors, tokens, kl_budget=...) -> LayerSweep`.
- `decompose`: `encode_vector`, `encode_shift`, `top_by_cosine`, `decoder_cosines`,
  `nn_decompose(v, sae.W_dec) -> Decomposition` (NN-OMP with NNLS refits; error curve;
  takes the SAE's parameters as they are), `precision_at_k`,
  `latent_f1(sae, x, labels)`, `concept_latents(f1_row, threshold)`.
- `downstream`: `downstream_effects(model, hook, vector, multiplier, tokens, saes)
  -> DownstreamResult` (table + [hooks × top features] matrix).
- `probes`: `train_probe(x, y) -> Probe`, `concept_probe(store, hook, concept, negative)`,
  `cosine_table({name: direction})`.
- `targeted`: `targeted_vectors(v, W_dec, decomposition, k)`, `compare_vectors(...)`.
- `run`: `ConceptConfig`, `run_concept(...) -> ConceptResult`, `write_concept(result,
  steering_dir)`, `load_probes(folder)`, `figures(result)`, `figures_from_dict(json)`,
  `concept_headline(evaluation)`.
- `decompose_run`: `decompose_concept(model, set, vectors, evaluation, saes, store, cfg)
  -> dict`, `write_decomposition(dd, decomposition_dir, concept, model)`,
  `decomposition_figures(dd, concept)`, `decomposition_headline(dd)`,
  `read_position_truth(...)`.
"""

from __future__ import annotations

from stages.lazy import lazy_exports

# Names exported here, by the submodule defining them; each is imported on first use
# (PEP 562), so that importing one light submodule (e.g. `stages.steering.prompts`) does
# not run, and make a DVC stage depend on, the rest of the package.
_EXPORTS = {
    "apply": "generate_steered steer steering_hooks",
    "decompose": (
        "Decomposition concept_latents decoder_cosines encode_shift encode_vector latent_f1 nn_decompose precision_at_k top_by_cosine"
    ),
    "decompose_run": (
        "decompose_concept decomposition_figures decomposition_headline read_position_truth "
        "write_decomposition"
    ),
    "downstream": "DownstreamResult downstream_effects",
    "evaluate": (
        "LayerSweep SideEffects Steerability behaviour_metric layer_sweep metric_grid side_effects steerability"
    ),
    "probes": "Probe concept_probe cosine_table train_probe",
    "prompts": (
        "ContrastivePair EvalPrompt SteeringSet load_sets read_set read_sets target_ids toy_sets "
        "write_set"
    ),
    "run": (
        "ConceptConfig ConceptResult concept_headline figures figures_from_dict load_probes "
        "run_concept write_concept"
    ),
    "targeted": "compare_vectors targeted_vectors",
    "vectors": ("compute_vectors load_vector mean_diff pca_direction read_activations save_vector"),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
