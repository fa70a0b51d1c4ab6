"""Concept geometry (the `geometry@M` stage): concept vectors under the causal inner
product (Park et al. 2024), hierarchical orthogonality, the mammal / bird / fish simplex,
weekday / month circles (Engels et al. 2024) and clusters of SAE decoder directions, each
against a null.

Modules: `vectors` (whitening, the LDA-style estimator, token sets, per-token means),
`claims` (the tests and their nulls), `clusters` (decoder-direction clusters and purity),
`run` (one model's whole analysis: `model_geometry`), `config` (the params section).
"""
