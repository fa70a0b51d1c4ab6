"""DVC stage `lm@<model>`: train a toy model, or check a pretrained one loads.

    python -m flows.lm toy-a

Toy models: a byte-level BPE tokenizer and a HookedTransformer trained on the corpus'
training split (resumable from `data/models/<name>.partial/`), evaluated on held-out
windows against the corpus' unigram entropy. Pretrained models: loaded by name once so
a missing hub / cache fails here, with a message saying what was needed.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from flows.common import main, transient_only
from stages.config import PretrainedModel, ToyModel, flatten, load_params
from stages.io import atomic_dir, read_json, resume_or_reset, write_json
from stages.layout import Layout
from stages.tracking import stage_run

LAYOUT = Layout()
CORPUS = LAYOUT.corpus
SAMPLE_PROMPTS = ["The brown dog", "On Monday the weather", "Tom counts the birds: three,",
                  "After March comes", "In May the ducks"]  # fmt: skip


@task(cache_policy=NO_CACHE)
def prepare(m: ToyModel, tok_dir: Path):
    from stages.corpus import read_corpus
    from stages.models import corpus_windows, train_tokenizer

    c = read_corpus(CORPUS)
    texts = [t for t, s in zip(c.texts, c.splits, strict=True) if s == "train"]
    tok = train_tokenizer(texts, m.tokenizer.vocab_size, tok_dir)
    train = corpus_windows(c, tok, m.train.seq_len, "train")
    held = corpus_windows(c, tok, m.train.seq_len, "heldout")
    held_ix = [i for i, s in enumerate(c.splits) if s == "heldout"]
    held_texts = [c.texts[i] for i in held_ix]
    held_entropy = [c.entropy_nats[i] for i in held_ix] if c.entropy_nats else None
    return tok, train, held, c.meta["corpus_hash"], held_texts, held_entropy


@task(cache_policy=NO_CACHE)
def world(model, texts: list[str], entropy_nats) -> dict:
    """Capture of each planted dependency, corpus entropy per token (stages/capture.py)."""
    from stages.capture import world_metrics

    return world_metrics(model, texts, entropy_nats)


@task(cache_policy=NO_CACHE)
def untrained_capture(m: ToyModel, tok, texts: list[str]) -> dict:
    """The control for capture: the same architecture and seed, untrained (a model that has
    seen no data should capture about 0 of every dependency)."""
    from stages.capture import world_metrics
    from stages.models import build_toy_model

    return world_metrics(build_toy_model(m, tok), texts, None)["capture"]


@task(cache_policy=NO_CACHE, retries=1, retry_condition_fn=transient_only)
def train(m: ToyModel, tok, train_w, held_w, ckpt: Path):
    from stages.models import build_toy_model, train_toy_model

    model = build_toy_model(m, tok)
    return model, train_toy_model(model, m, train_w, held_w, ckpt_dir=ckpt)


@task(cache_policy=NO_CACHE)
def samples(model, seed: int) -> list[str]:
    from stages.models import sample

    return sample(model, SAMPLE_PROMPTS, seed)


@flow(name="lm")
def lm_flow(name: str) -> dict:
    params = load_params()
    if name not in params.models:
        raise KeyError(f"model {name!r} is not in params.yaml models ({', '.join(params.models)})")
    m = params.models[name]
    out = LAYOUT.model(name)
    metrics_file = LAYOUT.metrics("lm", name)
    inputs = {"corpus": CORPUS} if isinstance(m, ToyModel) else {}
    with stage_run(f"lm@{name}", flatten(m, f"models.{name}."), inputs) as run:
        if isinstance(m, PretrainedModel):
            from stages.models import load_pretrained, write_pretrained_card

            model = load_pretrained(m.name, m.dtype)
            with atomic_dir(out, within=LAYOUT.model()) as tmp:
                write_pretrained_card(model, m, tmp)
            summary = {"n_layers": model.cfg.n_layers, "d_model": model.cfg.d_model}
        else:
            from stages.models import save_toy_model

            partial = LAYOUT.partial(out)
            resume_or_reset(partial, {"model": m.model_dump(mode="json"),
                                      "corpus": read_json(CORPUS / "meta.json")["corpus_hash"]})  # fmt: skip
            tok, train_w, held_w, corpus_hash, held_texts, held_h = prepare(
                m, partial / "tokenizer"
            )
            control = untrained_capture(m, quote(tok), quote(held_texts))
            model, res = train(m, quote(tok), quote(train_w), quote(held_w), partial / "ckpt")
            gens = samples(quote(model), m.seed)
            w = world(quote(model), quote(held_texts), quote(held_h))
            with atomic_dir(out, within=LAYOUT.model()) as tmp:
                save_toy_model(model, m, partial / "tokenizer", tmp)
                write_json(tmp / "world.json", {"model": name, "seed": m.seed,
                                                "heldout_loss": res.heldout_loss, **w,
                                                "untrained_capture": control})  # fmt: skip
            shutil.rmtree(partial)
            summary = {
                "heldout_loss": round(res.heldout_loss, 6),
                "unigram_entropy": round(res.unigram_entropy, 6),
                "loss_ratio_to_unigram": round(res.heldout_loss / res.unigram_entropy, 6),
                # None for an untrained model (train.tokens 0: no step, no loss)
                "final_train_loss": round(res.final_train_loss, 6) if res.steps else None,
                "steps": res.steps,
                "tokens_seen": res.tokens_seen,
                "n_params": sum(p.numel() for p in model.parameters()),
                **w,
            }
            if "corpus_entropy_per_token" in w:
                summary["loss_minus_corpus_entropy"] = round(
                    res.heldout_loss - w["corpus_entropy_per_token"], 6
                )
            summary["untrained_capture"] = {dep: {k: c[k] for k in ("capture", "ci95")}
                                            for dep, c in control.items()}  # fmt: skip
            for dep, c in w["capture"].items():
                u = control[dep]
                run.metrics({f"capture.{dep}": c["capture"],
                             f"capture_untrained.{dep}": u["capture"]})  # fmt: skip
                print(f"lm@{name}: {dep} capture {c['capture']:.3f} (95 % {c['ci95']}) of a "
                      f"true contrast {c['true_contrast']:.2f} nats; untrained "
                      f"{u['capture']:.3f} (95 % {u['ci95']})")  # fmt: skip
            for step, loss in res.loss_curve:
                run.metrics({"train_loss": loss}, step=step)
            run.metrics({"train_tokens_per_s": res.tokens_per_s})
            run.text("\n\n".join(gens), "samples.txt")
            run.tag("corpus_hash", corpus_hash)
            print(f"lm@{name}: held-out loss {res.heldout_loss:.3f} nats/token vs unigram "
                  f"entropy {res.unigram_entropy:.3f}; {res.tokens_per_s:,.0f} train tokens/s")  # fmt: skip
            for g in gens:
                print("  sample:", g.replace("\n", " ")[:120])
        metrics_file.parent.mkdir(parents=True, exist_ok=True)
        write_json(metrics_file, summary)
        run.metrics({k: v for k, v in summary.items() if isinstance(v, int | float)})
        print(f"lm@{name}: model -> {out}/, metrics -> {metrics_file}")
    return summary


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m flows.lm <model-name>")
    main(lambda: lm_flow(sys.argv[1]), f"lm@{sys.argv[1]}")
