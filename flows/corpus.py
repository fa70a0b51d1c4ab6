"""DVC stage `corpus`: build the documents and concept labels (`python -m flows.corpus`)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from flows.common import main, transient_only
from stages.config import flatten, load_params
from stages.corpus import Corpus, build_corpus, write_corpus
from stages.io import write_json
from stages.layout import Layout
from stages.tracking import stage_run

OUT = Layout().corpus
METRICS = Layout().metrics("corpus")


@task(cache_policy=NO_CACHE)
def generate(params) -> Corpus:
    return build_corpus(params)


@task(cache_policy=NO_CACHE, retries=2, retry_condition_fn=transient_only)
def write(corpus: Corpus, params) -> dict:
    return write_corpus(corpus, OUT, params)


# Big task arguments are passed through `quote`: Prefect otherwise walks every element
# of a parameter looking for futures (half a minute for this corpus' labels).


@flow(name="corpus")
def corpus_flow() -> dict:
    params = load_params()
    p = params.corpus
    with stage_run("corpus", flatten(p, "corpus."), {"params.yaml": Path("params.yaml")}) as run:
        meta = write(quote(generate(p)), p)
        summary = {
            k: meta[k] for k in ("n_docs", "n_train_docs", "n_heldout_docs", "n_chars", "n_labels")
        }
        METRICS.parent.mkdir(exist_ok=True)
        write_json(METRICS, {**summary, "corpus_hash": meta["corpus_hash"]})
        run.metrics(summary)
        run.tag("corpus_hash", meta["corpus_hash"])
        run.artifact(OUT / "meta.json")
        print(f"corpus: {meta['n_docs']} documents, {meta['n_chars']:,} characters, "
              f"{meta['n_labels']:,} concept labels -> {OUT}/")  # fmt: skip
    return meta


if __name__ == "__main__":
    main(corpus_flow, "corpus")
