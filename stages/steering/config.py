"""`steering` in params.yaml: the contrastive sets, the per-concept analysis knobs, and
per model the sets, hooks and SAEs (`stages/steering/run.py`, `flows/steering.py`).

Its own module, pydantic only, so that every stage's params check (stages/config.py)
reads it without importing the steering machinery (torch, scipy, pyarrow).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import model_validator

from stages.activations.hook_names import check_hook_name
from stages.layout import is_inside, why_unsafe
from stages.models_config import a_model
from stages.params_messages import KeyProblem
from stages.params_types import Fraction, NonNegInt, PosFloat, PosInt, Seed, StrictModel

if TYPE_CHECKING:
    from stages.config import Params

# where JSONL steering sets live: the steering stage's DVC dependency (dvc.yaml)
PROMPTS_DIR = "data/prompts"
TOY_STEERING_SETS = ("emotion_polarity", "mammal_vs_bird", "past_vs_present")


class ToySteeringSets(StrictModel):
    """Contrastive sets generated from the embedded corpus's grammar."""

    seed: Seed = 0
    n_train: PosInt = 64  # training pairs per set (the vector is built from these)
    n_heldout: PosInt = 32  # held-out pairs / eval prompts per set


class SteeringConfig(StrictModel):
    """Shared knobs of the per-concept analysis (`stages.steering.ConceptConfig`)."""

    method: Literal["mean_diff", "pca"] = "mean_diff"
    multipliers: list[float] = [-8.0, -6.0, -4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0, 6.0, 8.0]
    positions: Literal["last", "all"] = "last"  # where eval prompts are steered
    side_positions: Literal["last", "all"] = "all"  # where neutral text is steered (KL, CE)
    kl_multiplier: PosFloat = 4.0  # side effects measured at this multiplier
    kl_budget: PosFloat = 0.5  # nats/token: the layer sweep picks the best layer within it
    n_windows: PosInt = 32  # held-out corpus windows for side effects and downstream effects
    batch_size: PosInt = 64
    max_features: PosInt = 32  # non-negative OMP steps (the error curve's length)
    targeted_k: PosInt = 5  # features kept by the feature-targeted vector
    # random directions every steering effect is tested against (stages/steering/controls.py)
    n_random: PosInt = 32
    kl_windows: PosInt = 8  # held-out windows for the equal-KL search (of n_windows)
    equal_kl_at: PosFloat = 1.0  # equal-KL target = the raw vector's KL at this multiplier
    # directional ablation and ablate+add per steering hook (stages/steering/interventions.py)
    # random directions of the vector's norm (p floor 1/(n+1)); 8 keeps the default run in
    # its budget (~0.4 s a hook on the default models), 32 for the standard
    ablation_random: PosInt = 8
    ablate_add_multipliers: list[float] = [-1.0, 0.0, 1.0]  # must include 0 (= ablation)
    # clamping the decomposition's top targeted_k latents, × their max on positive prompts
    clamp_multiples: list[float] = [0.5, 1.0, 2.0, 4.0, 8.0]  # the figure's grid
    clamp_at: PosFloat = 1.0  # the tested clamp: each latent at its max on positive prompts
    clamp_random: PosInt = 32  # draws of as many random active latents clamped the same way
    clamp_kl_random: NonNegInt = 4  # of those, how many also get their KL measured
    gt_f1_threshold: Fraction = 0.3  # a latent is a concept's ground truth above this F1
    # the rest of the seeds' programme (stages/steering/multilayer.py, stability.py,
    # similarity.py): every steering hook at once against random directions there; the
    # vector over random halves of its pairs (and a shuffled-label null) and read 1, 2
    # tokens earlier; n_effect_splits of the splits' half vectors also steer
    multilayer: bool = True
    stability_splits: NonNegInt = 20  # 0: no stability analysis
    stability_effect_splits: NonNegInt = 1
    similarity_draws: PosInt = 1000  # bootstrap and permutation draws of similarity vs effect
    n_generations: NonNegInt = 3
    max_new_tokens: PosInt = 10
    generation_multiplier: PosFloat = 4.0
    seed: Seed = 0

    @model_validator(mode="after")
    def _symmetric(self) -> SteeringConfig:
        if self.n_random < 2:
            raise KeyProblem(("n_random",), self.n_random, "expected an integer ≥ 2 (the "
                            "random-direction null needs a spread; 32 or more for z and p)")  # fmt: skip
        a = self.ablate_add_multipliers
        if 0.0 not in a or len(set(a)) < 2:
            raise KeyProblem(("ablate_add_multipliers",), a, "expected at least two distinct "
                            "values including 0 (m = 0 is the directional ablation)")  # fmt: skip
        c = self.clamp_multiples
        if len(set(c)) < 2 or len(set(c)) != len(c) or min(c) <= 0:
            raise KeyProblem(("clamp_multiples",), c, "expected at least two distinct "
                            "positive values (× each latent's max activation)")  # fmt: skip
        for key in ("ablation_random", "clamp_random"):
            if getattr(self, key) < 2:
                raise KeyProblem((key,), getattr(self, key), "expected an integer ≥ 2 (the "
                                "null needs a spread)")  # fmt: skip
        m = sorted(self.multipliers)
        if len(set(m)) < 2:  # [0, 0, 0]: no slope to fit
            raise KeyProblem(("multipliers",), self.multipliers, "expected at least two "
                            "distinct finite values (steerability is a slope over them)")  # fmt: skip
        if len(m) < 3 or m != sorted(-x for x in m) or 0.0 not in m:
            raise KeyProblem(("multipliers",), self.multipliers, "expected a symmetric range "
                            "around 0 that includes 0 (steerability is a slope over it)")  # fmt: skip
        return self


class ModelSteering(StrictModel):
    """Per model: the sets to build vectors for, the hooks to sweep, the SAE per hook."""

    # a name from the generated toy sets, or a JSONL file (data/prompts/README.md)
    sets: list[str]
    hooks: list[str]  # steering layers: vectors at each, the layer sweep picks one
    # hook -> SAE folder name under data/saes/<model>/<hook>/: decomposition at the chosen
    # hook, downstream effects at every later one
    saes: dict[str, str] = {}

    @model_validator(mode="after")
    def _sets_exist(self) -> ModelSteering:
        if not self.sets:
            raise KeyProblem(("sets",), [], "expected at least one contrastive set")
        for i, s in enumerate(self.sets):
            if s not in TOY_STEERING_SETS and not s.endswith(".jsonl"):
                raise KeyProblem(("sets", i), s, "expected one of the generated sets "
                                f"{list(TOY_STEERING_SETS)} or a .jsonl file")  # fmt: skip
            # Only that the file is there: parsing it here (stages.steering.prompts)
            # would import torch, scipy and pyarrow into every stage's params check.
            # The steering stage's DVC dependency is data/prompts/ (dvc.yaml): a set
            # elsewhere would go stale unseen (`dvc status` would not see it change).
            if s.endswith(".jsonl") and not is_inside(PROMPTS_DIR, s):
                raise KeyProblem(("sets", i), s, f"expected a JSONL file under "
                                f"{PROMPTS_DIR}/, the steering stage's DVC dependency "
                                "(copy it there, so that `dvc status` sees it change)")  # fmt: skip
            if s.endswith(".jsonl") and not Path(s).is_file():
                raise KeyProblem(("sets", i), s, "expected an existing JSONL file "
                                "(no such file; paths are relative to the repository root)")  # fmt: skip
            if s in self.sets[:i]:
                raise KeyProblem(("sets", i), s, "expected each set once")
        if not self.hooks:
            raise KeyProblem(("hooks",), [], "expected at least one hook")
        return self


class SteeringParams(StrictModel):
    toy_sets: ToySteeringSets = ToySteeringSets()
    config: SteeringConfig = SteeringConfig()
    models: dict[str, ModelSteering]

    def check(self, p: Params) -> None:
        """Against `models`, `activations` and `saes`: known models, valid hooks, and
        SAEs that the sweep trains on a cached hook."""
        for name, ms in self.models.items():
            loc = ("steering", "models", name)
            if name not in p.models:
                raise KeyProblem(loc, name, a_model(p.models))
            cached = p.activations.hooks.get(name, [])
            for i, hook in enumerate(ms.hooks):
                why = check_hook_name(hook, p.models[name].n_layers)
                if why:
                    raise KeyProblem((*loc, "hooks", i), hook, why)
            folders = p.sae_folders(name)
            for hook, sae in ms.saes.items():
                if hook not in cached:
                    raise KeyProblem((*loc, "saes", hook), sae,
                                    f"expected a cached hook of {name}: {cached}")  # fmt: skip
                if why := why_unsafe(sae):  # data/saes/<model>/<hook>/<sae>/
                    raise KeyProblem((*loc, "saes", hook), sae, why)
                names = folders.get(hook, [])
                if names is None:
                    continue  # known only once the model is loaded: checked by the stage
                if sae not in names:
                    raise KeyProblem((*loc, "saes", hook), sae,
                                    f"expected an SAE trained on that hook by saes.sweep.{name}: {names}")  # fmt: skip
