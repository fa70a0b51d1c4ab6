"""The seed study: more toy models (seeds) aligned pairwise, as one DVC experiment beside
the default run (README, "The seed study").

    python -m flows.seed_study              # queue the experiment and start the queue
    python -m flows.seed_study --seeds 2 3  # toy-s2 and toy-s3: 4 models, 6 pairs
    python -m flows.seed_study --workspace  # run it here (dvc exp run, no queue)
    python -m flows.seed_study --dry-run    # print the dvc commands instead
    python -m flows.seed_study --seeds --untrained 0 1   # the untrained-model control only
    python -m flows.seed_study --cross-tokenizer 3       # + toy-s3-v512: another vocabulary

The default run has two toy models (toy-a: seed 0, toy-b: seed 1), one pair. Each study
seed adds a model `toy-s<seed>` with exactly the base model's params (toy-a's: shape,
tokenizer, training) but that seed, with `dvc exp run -S +key=value` (Hydra's "append"
override; flows/overrides.py): `models`, `activations.hooks`, `steering.models` copied from
the base; `saes.sweep` cut down to the SAEs the other stages read (`align.config.sae_names`
on the hooks alignment compares, the SAE steering names per hook, `geometry.sae_names`),
so a new model costs its LM, its cache and a few SAEs; and `align.pairs` gets every pair
of the models not already there (3 models: 3 pairs). Geometry, steering, decomposition
and transfer run per model / pair from the same params. Every default stage keeps its
params, so DVC takes its outputs from the cache. The report then shows the aggregate
tables over all pairs (stages/alignment/aggregate.py).

`--untrained S…` adds the untrained-model control that the SAE-latent measures lack in
the default run: per seed a model `toy-u<seed>` with the base's params but
`train.tokens: 0` (the architecture and seed at initialisation), cached, given SAEs of
its own (the same configs as the base's) and steered like every other model. Pairs are
formed between models of different seeds only, so `--seeds --untrained 0 1` adds
untrained vs untrained (toy-u0__toy-u1) and trained vs untrained (toy-a__toy-u1,
toy-b__toy-u0); the report puts their partner fractions and matched correlations beside
the trained pairs' (`aggregate.pair_kind`).

Steering transfer is judged in the report as one Holm family over every trained pair,
concept and hook (m tests). Where the first `n_random` random directions all fall below
a carried vector, the transfer stage draws on to `align.transfer.extend_to`; the study
sets that to ⌈m / 0.05⌉ (3 pairs, 3 concepts, 2 hooks: 360), so that a strong
transfer's empirical p can survive the family's correction, which the default cap of
4 × n_random (floor 1/129; 18 tests × 1/129 = 0.14) cannot.

`--cross-tokenizer S…` adds per seed a model `toy-s<seed>-v<vocab>`: the base's params
with that seed and another tokenizer (`--vocab`, default 512: BPE on the same corpus with
fewer merges, so its tokens split the base's more finely: 1.38 times as many tokens a
text). On the default toy corpus BPE runs out of merges at ~700 tokens, so any vocabulary
of ~700 or more tokenizes exactly as the base's 1,024 does (768 did: the align stage's
`token_rule` then reads "identical" and the pair counts as a one-tokenizer pair). Pairs
with a different tokenization align rows on shared character spans
(stages/alignment/tokens.py), the path a one-tokenizer pair never takes, and the report
keeps them in a column of their own beside the seed pairs.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from typing import Any

from flows.overrides import hydra_value, run_dvc

SEEDS = (2,)
BASE = "toy-a"
NAME = "seed-study"
CROSS_VOCAB = 512
TRANSFER_ALPHA = 0.05  # the report's transfer family (stages/alignment/aggregate.py)


def study_model(seed: int, vocab: int | None = None) -> str:
    return f"toy-s{seed}" + (f"-v{vocab}" if vocab is not None else "")


def untrained_model(seed: int) -> str:
    return f"toy-u{seed}"


def _needed_saes(raw: dict[str, Any], p: Any, base: str) -> dict[str, set[str]]:
    """SAE folder name -> the base model's hooks where some stage reads it."""
    hooks = p.hooks(base)
    cfg = ((raw.get("align") or {}).get("config")) or {}
    if cfg.get("hook_pairs"):
        align_hooks = [h for h in hooks if any(h in hp for hp in cfg["hook_pairs"])]
    else:
        align_hooks = hooks  # None: every hook both models cache (all of the base's)
    folders = p.sae_folders(base)
    need: dict[str, set[str]] = {}
    names = cfg.get("sae_names")
    for h in align_hooks:
        have = sorted(folders.get(h) or [])
        picked = have if names == "all" else have[:1] if names is None else list(names)
        for n in picked:
            need.setdefault(n, set()).add(h)
    steering = (raw.get("steering") or {}).get("models", {}).get(base) or {}
    for h, n in (steering.get("saes") or {}).items():
        need.setdefault(n, set()).add(h)
    for n in (raw.get("geometry") or {}).get("sae_names") or []:
        for h in hooks:
            if n in (folders.get(h) or []):
                need.setdefault(n, set()).add(h)
    return need


def study_sweep(raw: dict[str, Any], p: Any, base: str = BASE) -> list[dict[str, Any]]:
    """The new model's `saes.sweep`: the base's SAE entries that some stage reads, each on
    the hooks where it is read (one group per entry), in params order."""
    from stages.sae.config import folder_name, parse_sae_config

    need = _needed_saes(raw, p, base)
    groups = raw["saes"]["sweep"][base]
    groups = groups if isinstance(groups, list) else [groups]
    out, seen = [], set()
    order = p.hooks(base)
    for g in groups:
        for entry in g["saes"]:
            hook = g["hooks"][0]
            name = folder_name(parse_sae_config(entry), p.hook_width(base, hook))
            if name in need and name not in seen:
                seen.add(name)
                out.append({"hooks": [h for h in order if h in need[name]], "saes": [entry]})
    missing = sorted(set(need) - seen)
    if missing:
        raise ValueError(f"params.yaml: saes.sweep.{base} trains no SAE named {missing}, "
                         "expected the SAEs align / steering / geometry read")  # fmt: skip
    return out


def overrides(raw: dict[str, Any], seeds=SEEDS, base: str = BASE, untrained=(),
              cross_tokenizer=(), vocab: int = CROSS_VOCAB) -> list[str]:  # fmt: skip
    """The `-S` values (Hydra overrides) that add one model per seed (one untrained model
    per `untrained` seed, one model with a `vocab`-token tokenizer per `cross_tokenizer`
    seed) and every pair of models with different seeds. `raw`: params.yaml as plain data."""
    from stages.config import parse_params

    p = parse_params(raw)
    if base not in p.models or raw["models"][base].get("source") != "toy":
        raise ValueError(f"params.yaml: models.{base}: expected a toy model to copy")
    taken = {m["seed"]: n for n, m in raw["models"].items() if m.get("source") == "toy"}
    out = []
    base_model = raw["models"][base]
    added = [(study_model(s), s, {**base_model, "seed": int(s)}) for s in seeds]
    added += [(untrained_model(s), s, {**base_model, "seed": int(s),
                                       "train": {**base_model.get("train", {}), "tokens": 0}})
              for s in untrained]  # fmt: skip
    base_vocab = (base_model.get("tokenizer") or {}).get("vocab_size")
    if cross_tokenizer and vocab == base_vocab:
        raise ValueError(f"--vocab {vocab}: {base}'s own vocabulary size, expected another")
    added += [(study_model(s, vocab), s, {**base_model, "seed": int(s),
                                          "tokenizer": {**base_model.get("tokenizer", {}),
                                                        "vocab_size": int(vocab)}})
              for s in cross_tokenizer]  # fmt: skip
    trained_seeds = [seed for name, seed, _ in added if not name.startswith("toy-u")]
    if len(set(trained_seeds)) < len(trained_seeds):
        raise ValueError("--seeds and --cross-tokenizer name one seed twice, expected "
                         "each seed once")  # fmt: skip
    for name, seed, model in added:
        if name in raw["models"] or (not name.startswith("toy-u") and seed in taken):
            raise ValueError(f"--seeds {seed}: model {taken.get(seed, name)} already has it, "
                             "expected seeds no toy model in params.yaml uses")  # fmt: skip
        out.append(f"+models.{name}={hydra_value(model)}")
        out.append(f"+activations.hooks.{name}={hydra_value(list(p.hooks(base)))}")
        out.append(f"+saes.sweep.{name}={hydra_value(study_sweep(raw, p, base))}")
        steering = (raw.get("steering") or {}).get("models", {}).get(base)
        if steering is not None:
            out.append(f"+steering.models.{name}={hydra_value(steering)}")
    seed_of = {n: m.get("seed") for n, m in raw["models"].items()}
    seed_of |= {name: seed for name, seed, _ in added}
    have = {frozenset((v["a"], v["b"])) for v in (raw["align"]["pairs"] or {}).values()}
    pairs = [tuple(sorted(p)) for p in have]
    for a, b in itertools.combinations(seed_of, 2):
        if frozenset((a, b)) not in have and seed_of[a] != seed_of[b]:
            out.append(f"+align.pairs.{a}__{b}={hydra_value({'a': a, 'b': b})}")
            pairs.append((a, b))
    extend = transfer_draws(raw, p, base, [pr for pr in pairs
                                           if not any(m.startswith("toy-u") for m in pr)])  # fmt: skip
    if extend is not None:
        out.append(f"++align.transfer.extend_to={extend}")
    return out


def transfer_draws(raw: dict[str, Any], p: Any, base: str, trained_pairs: list,
                   alpha: float = TRANSFER_ALPHA) -> int | None:  # fmt: skip
    """The random-direction draws a strong transfer needs so that the report's one Holm
    family over every trained pair, concept and hook (`aggregate.transfer_aggregate`, m
    tests at `alpha`) can reject on the empirical p: m / (draws + 1) < alpha. None when
    the pipeline's own cap (`align.transfer.extend_to`, default 4 × n_random) already
    allows it, or when nothing is steered."""
    steering = ((raw.get("steering") or {}).get("models") or {}).get(base) or {}
    m = len(trained_pairs) * len(steering.get("sets") or []) * len(steering.get("hooks") or [])
    if m == 0:
        return None
    tp = p.align.transfer
    have = 4 * tp.n_random if tp.extend_to is None else tp.extend_to
    need = math.ceil(m / alpha)
    return need if need > have else None


def commands(
    raw: dict[str, Any],
    seeds=SEEDS,
    base: str = BASE,
    queue: bool = True,
    name: str = NAME,
    untrained=(),
    cross_tokenizer=(),
    vocab: int = CROSS_VOCAB,
) -> list[list[str]]:
    """The dvc commands that run the study: one experiment (queued and started, or run
    in the workspace); every stage is a target, DVC skips those whose inputs did not change."""
    added = overrides(raw, seeds, base, untrained, cross_tokenizer, vocab)
    sets = [a for o in added for a in ("-S", o)]
    run = ["dvc", "exp", "run", *(["--queue"] if queue else []), "-n", name, *sets]
    return [run, ["dvc", "queue", "start", "-j", "1"]] if queue else [run]


def main(argv: list[str] | None = None) -> int:
    import yaml

    from stages.config import PARAMS_FILE, _UniqueKeyLoader

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="*", default=list(SEEDS),
                    help="trained models to add (none: --seeds alone)")  # fmt: skip
    ap.add_argument("--untrained", type=int, nargs="+", default=[], metavar="SEED",
                    help="untrained control models to add (train.tokens 0), e.g. 0 1")  # fmt: skip
    ap.add_argument("--cross-tokenizer", type=int, nargs="+", default=[], metavar="SEED",
                    help="models with another tokenizer (--vocab) to add, e.g. 3")  # fmt: skip
    ap.add_argument("--vocab", type=int, default=CROSS_VOCAB,
                    help=f"their vocabulary size (default {CROSS_VOCAB})")  # fmt: skip
    ap.add_argument("--base", default=BASE, help="the toy model whose params are copied")
    ap.add_argument("--name", default=NAME, help="the experiment's name")
    ap.add_argument("--workspace", action="store_true",
                    help="dvc exp run in this workspace instead of the queue")  # fmt: skip
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = ap.parse_args(argv)
    # the project's loader: the same YAML reading (1e-3 is a number) as every stage's
    raw = yaml.load(open(PARAMS_FILE).read(), Loader=_UniqueKeyLoader)  # noqa: S506
    if not args.seeds and not args.untrained and not args.cross_tokenizer:
        raise SystemExit("--seeds is empty and no --untrained or --cross-tokenizer: "
                         "nothing to add")  # fmt: skip
    run_dvc(commands(raw, args.seeds, args.base, not args.workspace, args.name,
                     args.untrained, args.cross_tokenizer, args.vocab), args.dry_run)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
