"""End to end on the tiny configuration: real DVC, real Prefect server, real MLflow store.

One `dvc repro` of corpus -> lm@M -> activations@M in a scratch project, then checks
that the outputs, the no-op re-run, a one-hook change, MLflow provenance and Prefect
flow runs all behave as a user would expect.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.backbone.conftest import TINY, copy_project, differing_files, out_md5s
from tests.backbone.conftest import run as _run

REPO = Path(__file__).resolve().parents[2]
# one xdist worker runs this module and the other that reads the session's tiny
# pipeline, so it is built once (tests/conftest.py, SHARED_PIPELINE)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tiny_pipeline, tmp_path_factory):
    """A copy of the session's tiny pipeline run (with its MLflow runs): these tests
    change params and re-run stages in it."""
    root = tmp_path_factory.mktemp("atlas") / "p"
    env = copy_project(tiny_pipeline, root, root.parent / "net.log")
    return {**tiny_pipeline, "root": root, "env": env}


def test_outputs_exist_and_are_sane(project):
    root = project["root"]
    from stages.activations import ActivationStore
    from stages.corpus import read_corpus

    corpus = read_corpus(root / "data/corpus")
    assert len(corpus.texts) == 240 and corpus.labels.num_rows > 1000
    for m in ("tiny-a", "tiny-b"):
        metrics = json.loads((root / f"metrics/lm/{m}.json").read_text())
        # the model learned the grammar: held-out loss well below the unigram entropy
        assert metrics["heldout_loss"] < 0.8 * metrics["unigram_entropy"]
        # what it learned of the planted world: a capture per dependency, with an interval
        cap = metrics["capture"]
        assert set(cap) == {"weather_emotion", "day_emotion", "class_verb", "count_next"}
        for c in cap.values():
            assert c["ci95"][0] <= c["capture"] <= c["ci95"][1] and c["true_contrast"] > 2
        assert 0.3 < metrics["corpus_entropy_per_token"] < metrics["heldout_loss"]
        store = ActivationStore(root / f"data/activations/{m}")
        assert store.hooks == TINY["activations"]["hooks"][m]
        assert store.corpus_hash == corpus.meta["corpus_hash"]
        x = store.read("blocks.0.hook_resid_post", "train")
        assert x.shape == (store.heldout_start, 32) and np.isfinite(x).all()
        labels = store.read("concept_labels")
        names = store.concept_names
        tok = store.read("token_ids")
        # tokens labelled 'dog' decode to dog(s) for this model's tokenizer
        from stages.models import load_tokenizer

        t = load_tokenizer(root / f"data/models/{m}")
        dog_tokens = {
            t.decode([i]).strip() for i in np.unique(tok[labels[:, names.index("dog")] == 1])
        }
        assert dog_tokens and dog_tokens <= {"dog", "dogs", "do", "g", "gs", "d", "og", "ogs", "s"}
        # token-level lexical baseline from the store: contextual concepts stay unreadable
        from stages.lexical import store_lexical_baseline

        lex = store_lexical_baseline(store, "all")  # a tiny vocabulary splits words, so
        assert lex["carp"]["f1"] == 1.0 and lex["pleasant_day"]["f1"] < 0.75  # not all are 1
        act = json.loads((root / f"metrics/activations/{m}.json").read_text())
        assert set(act["lexical_baseline_f1"]) == set(names)
    assert not list(root.glob("data/**/*.partial"))
    # both models share the tokenizer, so their rows align one to one
    a, b = (
        ActivationStore(root / "data/activations/tiny-a"),
        ActivationStore(root / "data/activations/tiny-b"),
    )
    assert np.array_equal(a.read("token_ids"), b.read("token_ids"))


def test_sae_stage_writes_saelens_folders_metrics_and_plots(project):
    root = project["root"]
    from sae_lens import SAE

    for m in ("tiny-a", "tiny-b"):
        metrics = json.loads((root / f"metrics/saes/{m}.json").read_text())
        saes = metrics["blocks.0.hook_resid_post"]
        assert set(saes) == {"topk-128-k4", "relu-128-l1c5"}
        topk = saes["topk-128-k4"]
        assert abs(topk["l0"] - 4) < 1e-6 and 0 <= topk["fvu"] < 0.8
        assert topk["ce_loss_recovered"] > 0.3 and 0 <= topk["mean_best_f1"] <= 1
        ratio = [topk[f"sae_to_random_kl_ratio{s}"] for s in ("_lo", "", "_hi")]
        assert ratio == sorted(ratio) and topk["kl_random_sd_draws"] > 0  # Gurnee, 16 draws
        folder = root / f"data/saes/{m}/blocks.0.hook_resid_post/topk-128-k4"
        sae = SAE.load_from_disk(str(folder))
        assert sae.cfg.d_in == 32 and sae.cfg.d_sae == 128
        rows = json.loads((root / f"plots/saes/{m}.json").read_text())
        assert {r["architecture"] for r in rows} == {"topk", "relu"}


def test_noop_repro_runs_nothing(project):
    p = _run(["dvc", "repro"], project["root"], project["env"])
    assert "Running stage" not in p.stdout
    assert "up to date" in p.stdout


def test_changing_one_models_hook_reruns_only_that_cache(project):
    root, env = project["root"], project["env"]
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["activations"]["hooks"]["tiny-b"] = [
        "blocks.0.hook_resid_post",
        "blocks.1.hook_resid_post",
    ]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    p = _run(["dvc", "repro"], root, env)
    ran = [ln.split("'")[1] for ln in p.stdout.splitlines() if ln.startswith("Running stage")]
    # that model's cache, and what reads it; not the LMs, not the other model's stages
    assert ran == ["activations@tiny-b", "saes@tiny-b", "steering@tiny-b", "decompose@tiny-b",
                   "align@tiny-a__tiny-b", "transfer@tiny-a__tiny-b", "geometry@tiny-b",
                   "report"]  # fmt: skip
    from stages.activations import ActivationStore

    assert ActivationStore(root / "data/activations/tiny-b").hooks == [
        "blocks.0.hook_resid_post",
        "blocks.1.hook_resid_post",
    ]


def test_bad_params_stop_before_any_work(project):
    root, env = project["root"], project["env"]
    good = (root / "params.yaml").read_text()
    params = yaml.safe_load(good)
    params["models"]["tiny-a"]["arch"]["d_model"] = -4
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        before = sorted(p.name for p in (root / "data").rglob("*"))
        p = _run([sys.executable, "-m", "flows.lm", "tiny-a"], root, env, check=False)
        assert p.returncode == 2
        assert p.stderr.strip().splitlines()[-1] == (
            "error: params.yaml: models.tiny-a.arch.d_model = -4, expected an integer ≥ 1"
        )
        assert sorted(p.name for p in (root / "data").rglob("*")) == before
    finally:
        (root / "params.yaml").write_text(good)
    if not torch.cuda.is_available():  # a GPU asked for on a machine without one
        before = sorted(p.name for p in (root / "data").rglob("*"))
        p = _run([sys.executable, "-m", "flows.saes", "tiny-a"], root,
                 {**env, "ATLAS_DEVICE": "cuda"}, check=False)  # fmt: skip
        assert p.returncode == 2
        assert (
            p.stderr.strip()
            .splitlines()[-1]
            .startswith("error: ATLAS_DEVICE = 'cuda', but torch sees no CUDA device here")
        ), p.stderr[-2000:]
        assert sorted(p.name for p in (root / "data").rglob("*")) == before


def test_mlflow_runs_carry_provenance(project):
    root, env = project["root"], project["env"]
    code = (
        "import json, mlflow; mlflow.set_tracking_uri(__import__('os').environ['MLFLOW_TRACKING_URI']);"
        "rs = mlflow.search_runs(experiment_names=['feature-atlas'], output_format='list');"
        "print(json.dumps([[r.info.run_id, r.info.run_name, r.data.tags, r.data.params, r.data.metrics] for r in rs]))"
    )
    runs = json.loads(_run([sys.executable, "-c", code], root, env).stdout)
    by_name = {}
    for run_id, name, tags, params, metrics in runs:
        by_name.setdefault(name, []).append((run_id, tags, params, metrics))
    assert {"corpus", "lm@tiny-a", "lm@tiny-b", "activations@tiny-a", "activations@tiny-b"} <= set(
        by_name
    )
    parents = {
        n: v[-1][1].get("mlflow.parentRunId")
        for n, v in by_name.items()
        if n != "activations@tiny-b"
    }
    pipeline_runs = [r for r in runs if r[2].get("atlas.kind") == "pipeline"]
    assert pipeline_runs, "dvc repro must open a parent run"
    assert len({p for p in parents.values() if p}) >= 1
    run_id, tags, params, metrics = by_name["lm@tiny-a"][-1]
    assert tags["dvc.stage"] == "lm@tiny-a" and tags["git.commit"]
    assert len(tags["input.corpus"]) == 36  # md5 + '.dir'
    assert params["models.tiny-a.arch.d_model"] == "32"
    assert metrics["heldout_loss"] > 0
    for stage in ("activations@tiny-a", "saes@tiny-b"):  # where the heavy stages ran
        t = by_name[stage][-1][1]
        assert (t["compute.device"], t["compute.precision"]) == ("cpu", "fp32"), t
        assert int(t["torch.num_threads"]) >= 1
    report = by_name["report"][-1][3]  # its wall time, not the sum of its parts and itself
    assert report["seconds"] == report["seconds.total"] > report["seconds.dashboards_compute"]
    prov = _run([sys.executable, "-m", "flows.cli", "provenance", run_id], root, env)
    out = json.loads(prov.stdout)
    assert (
        out["dvc_stage"] == "lm@tiny-a" and out["inputs"]["corpus"]["hash"] == tags["input.corpus"]
    )


def test_prefect_recorded_every_stage_as_a_flow_run(project):
    root, env = project["root"], project["env"]
    code = (
        "import asyncio, json\n"
        "from prefect.client.orchestration import get_client\n"
        "async def main():\n"
        "    async with get_client() as c:\n"
        "        runs = await c.read_flow_runs()\n"
        "        flows = {f.id: f.name for f in await c.read_flows()}\n"
        "        tasks = await c.read_task_runs()\n"
        "        print(json.dumps({'flows': [[flows[r.flow_id], r.state_type.value] for r in runs], 'n_tasks': len(tasks)}))\n"
        "asyncio.run(main())\n"
    )
    out = json.loads(_run([sys.executable, "-c", code], root, env).stdout)
    names = [n for n, state in out["flows"] if state == "COMPLETED"]
    assert names.count("lm") >= 2 and names.count("activations") >= 2 and "corpus" in names
    assert out["n_tasks"] >= 10


def test_sae_stage_killed_mid_training_resumes_and_matches(project, tmp_path):
    """kill -9 of `dvc repro` while the SAEs train; the re-run resumes from the
    checkpoints and ends with the same weights and metrics as an uninterrupted run."""
    root = tmp_path / "p"
    shutil.copytree(project["root"], root, ignore=shutil.ignore_patterns("mlflow.db", "mlruns"))
    env = {**project["env"], "PYTHONPATH": str(root),
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}  # fmt: skip
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["saes"]["checkpoint_every"] = 100
    params["saes"]["sweep"]["tiny-a"] = {
        "hooks": ["blocks.0.hook_resid_post"],
        "saes": [{"architecture": "topk", "expansion_factor": 16, "k": 4,
                  "n_training_tokens": 800_000, "batch_size": 256, "lr": 0.003}],
    }  # fmt: skip
    params["steering"]["models"]["tiny-a"]["saes"] = {"blocks.0.hook_resid_post": "topk-512-k4"}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    hook = "blocks.0.hook_resid_post"
    log = (tmp_path / "killed.log").open("w")
    state = root / f"data/saes/tiny-a.partial/{hook}/topk-512-k4/checkpoint/state.json"
    proc = subprocess.Popen(["dvc", "repro", "saes@tiny-a"], cwd=root, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["step"] >= 300:
            break
        time.sleep(0.05)
    assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
    import psutil

    # dvc and the stage process it started (in a process group of its own)
    victims = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    assert any("flows.saes" in " ".join(v.cmdline()) for v in victims)
    for v in victims:
        v.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(victims, timeout=10)
    killed_at = json.loads(state.read_text())["step"]
    assert 300 <= killed_at < 3125
    assert not (root / "data/saes/tiny-a").exists(), "no half-written output"

    p = _run(["dvc", "repro", "saes@tiny-a"], root, env)
    assert "resuming from checkpoints" in p.stdout + p.stderr
    assert not (root / "data/saes/tiny-a.partial").exists()
    folder = root / f"data/saes/tiny-a/{hook}/topk-512-k4"
    resumed = {f: (folder / f).read_bytes() for f in ("sae_weights.safetensors", "metrics.json")}

    # the uninterrupted reference; a second `dvc repro` meanwhile fails fast on DVC's lock
    # and leaves the first unharmed
    first_log = tmp_path / "first.log"
    first = subprocess.Popen(["dvc", "repro", "-f", "-s", "saes@tiny-a"], cwd=root, env=env,
                             stdout=first_log.open("w"), stderr=subprocess.STDOUT)  # fmt: skip
    while not state.exists() and first.poll() is None:
        time.sleep(0.05)
    t0 = time.perf_counter()
    second = _run(["dvc", "repro"], root, env, check=False)
    assert second.returncode != 0 and time.perf_counter() - t0 < 30
    # DVC's per-path read/write lock: "... is busy, it is being blocked by: ... remove
    # '.dvc/tmp/rwlock' ..." (or its repo lock: "Unable to acquire lock")
    said = second.stdout + second.stderr
    assert "rwlock" in said or "Unable to acquire lock" in said, said
    assert first.wait(timeout=600) == 0, first_log.read_text()[-3000:]
    for f, content in resumed.items():
        assert (folder / f).read_bytes() == content, f


def test_a_steering_change_reruns_the_transfer_test_not_the_alignment(project, tmp_path):
    """Transfer is its own stage: a steering or transfer param re-runs it (and steering,
    report), never the alignment pass; a code change re-runs exactly the stages that run
    that file (dvc.yaml's code deps are the imports, tests/dvc_deps.py)."""
    root = tmp_path / "p"
    shutil.copytree(project["root"], root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["align"]["transfer"]["n_random"] = 8
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = _run(["dvc", "status"], root, project["env"]).stdout
    stale = {ln.rstrip(":").strip() for ln in changed.splitlines() if ln and not ln[0].isspace()}
    assert "transfer@tiny-a__tiny-b" in stale and "align@tiny-a__tiny-b" not in stale, changed
    params["align"]["transfer"]["n_random"] = 32
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with open(root / "stages/alignment/transfer.py", "a") as f:
        f.write("\n# an edit\n")
    changed = _run(["dvc", "status"], root, project["env"]).stdout
    stale = {ln.rstrip(":").strip() for ln in changed.splitlines() if ln and not ln[0].isspace()}
    assert stale == {"transfer@tiny-a__tiny-b"}, changed


def test_steering_alignment_and_report_outputs(project):
    root = project["root"]
    from stages.steering import load_vector

    vectors, meta = load_vector(root / "data/steering/tiny-a/past_vs_present")
    assert set(vectors) == {"blocks.0.hook_resid_post"} and meta["n_pairs"] == 16
    m = json.loads((root / "metrics/steering/tiny-a.json").read_text())["past_vs_present"]
    assert np.isfinite(m["steerability"]) and 0 <= m["wrong_way_fraction"] <= 1 and m["kl"] >= 0
    # against 32 random directions of its norm: p never below its floor 1/33
    assert m["random.n"] == 32 and m["steerability_p"] >= m["random.p_floor"] == round(1 / 33, 6)
    dec = json.loads((root / "data/decomposition/tiny-a/past_vs_present/decomposition.json")
                     .read_text())  # fmt: skip
    assert dec["sae"] == "topk-128-k4" and len(dec["nn_decomposition"]["curve"]) == 8
    # directional ablation against 8 random directions (the default), the clamp against
    # 32 random latent sets: p never below its floor
    assert m["ablation.random.n"] == 8 and m["ablation.drop_p"] >= m["ablation.random.p_floor"]
    dm = json.loads((root / "metrics/decomposition/tiny-a.json").read_text())["past_vs_present"]
    assert dm["clamp.random.n"] == 32 and dm["clamp.p"] >= dm["clamp.random.p_floor"]
    assert dec["clamp"]["latents"] and dm["clamp.kl"] > 0
    scores = json.loads((root / "metrics/alignment/tiny-a__tiny-b.json").read_text())
    assert 1000 < scores["n_tokens"] <= 4000
    key = "blocks.0.hook_resid_post/topk-128-k4"
    assert 0 <= scores[f"{key}/fraction_with_partner_hungarian"] <= 1
    # the untrained-model controls of the dense measures (both are toy models), with p
    for m in ("linear_cka", "mutual_knn", "svcca"):
        for c in ("untrained", "trained_vs_untrained"):
            assert 0 <= scores[f"{m}_{c}/blocks.0.hook_resid_post"] <= 1
            assert scores[f"{m}_{c}_p/blocks.0.hook_resid_post"] >= scores["p_floor"]
    assert "rsa_untrained/blocks.0.hook_resid_post" not in scores  # not in control_metrics
    assert 0 < scores["linear_cka_subsample/blocks.0.hook_resid_post"] <= 1
    transfer = json.loads((root / "data/transfer/tiny-a__tiny-b/transfer.json").read_text())
    row = transfer["concepts"]["past_vs_present"]["blocks.0.hook_resid_post"]
    assert {"own", "transferred", "random"} <= set(row) and row["random"]["n"] == 32
    assert (transfer["n_random"], transfer["extend_to"]) == (32, 128)  # extend_to null: 4 × 32
    rnd = row["random"]["slopes"]  # the null: 32 directions, p counts those at or above
    assert (
        row["p_vs_random"] == (1 + sum(r >= row["transferred"]["steerability"] for r in rnd)) / 33
    )
    tscores = json.loads((root / "metrics/transfer/tiny-a__tiny-b.json").read_text())
    assert tscores["transfer/past_vs_present/blocks.0.hook_resid_post/p_vs_random"] == round(
        row["p_vs_random"], 6)  # fmt: skip
    index = (root / "reports/index.html").read_text()
    assert "MLflow run" in index and "git" in index
    assert "Steering-vector transfer (tiny-a → tiny-b)" in index
    assert list((root / "reports/dashboards/tiny-a").rglob("feature-*.html"))


def test_the_dask_path_gives_the_local_paths_bytes(tiny_pipeline, tmp_path):
    """Every stage that runs its tasks on Dask (activations, saes, align), re-run in a copy
    of the session's local run on an existing 2-worker cluster (`dask scheduler` and
    `dask worker` processes; ATLAS_RUNNER=dask, ATLAS_DASK_ADDRESS): caching in shard
    runs, one SAE per task, the alignment pass in token parts. Every DVC output's md5 in
    dvc.lock is the local run's, and DVC then finds the stages that read them (steering,
    report) up to date.

    The stages before the caches never use Dask; a fresh process reproducing their bytes
    is checked by the kill tests. A cluster the stage starts itself (no address) is
    test_remote_store.py's and test_dask_prefect.py's."""
    from tests._servers import dask_cluster

    root = tmp_path / "p"
    env = copy_project(tiny_pipeline, root, tmp_path / "net.log", mlflow=False)
    on_dask = ["activations@tiny-a", "activations@tiny-b", "saes@tiny-a", "saes@tiny-b",
               "align@tiny-a__tiny-b"]  # fmt: skip
    with dask_cluster(2, root, env, tmp_path) as address:
        env.update(ATLAS_RUNNER="dask", ATLAS_DASK_ADDRESS=address)
        out = _run(["dvc", "repro", "-f", "-s", *on_dask], root, env)
    ran = [ln.split("'")[1] for ln in out.stdout.splitlines() if ln.startswith("Running stage")]
    assert ran == on_dask, out.stdout[-3000:]
    said = out.stdout + out.stderr
    # the Dask paths ran (the SAEs' says nothing of it; their bytes are compared below)
    assert said.count("shards in 2 runs on Dask workers") == 2, said[-3000:]
    assert "parts of the token pass on Dask workers" in said, said[-3000:]
    again = out_md5s(yaml.safe_load((root / "dvc.lock").read_text()))
    first = out_md5s(tiny_pipeline["lock"])
    differ = {p: (first[p], md5) for p, md5 in again.items() if first[p] != md5}
    files = differing_files(tiny_pipeline["root"], root, list(differ)) if differ else []
    # a retried or rescheduled task, or a resumed checkpoint, is the first thing to rule out
    events = [ln for ln in said.splitlines()
              if any(w in ln.lower() for w in ("retr", "resum", "reschedul", "lost", "numerics"))]  # fmt: skip
    assert not differ, (
        f"outputs differ between the local and the Dask run: {differ}; files: {files}; "
        f"retries, resumes, lost workers in the Dask run's log: {events[-10:]}"
    )
    status = _run(["dvc", "status"], root, env).stdout
    assert "Data and pipelines are up to date" in status, status
    assert not (tmp_path / "net.log").exists() or not (tmp_path / "net.log").read_text()


def test_atlas_run_two_at_a_time_gives_dvc_repros_bytes(tiny_pipeline, tmp_path):
    """`atlas run -j 2` (flows/parallel.py) on a copy of the session's `dvc repro` run,
    after a change to the steering flow's code: DVC's status makes the steering stages
    and what reads them stale (steering, decompose, transfer, report). The two steering
    stages run side by side, each through its own `dvc repro --single-item`, at the torch
    thread count the reference ran with (`--threads`), and write the reference's bytes;
    so DVC finds the stages after them unchanged and skips them. dvc.lock holds every
    stage with the reference's outputs, and DVC finds the pipeline up to date."""
    root = tmp_path / "p"
    env = copy_project(tiny_pipeline, root, tmp_path / "net.log", mlflow=False)
    with open(root / "flows/steering.py", "a") as f:
        f.write("# a comment: the code changed, not what it computes\n")
    threads = _run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                   root, env).stdout.strip()  # fmt: skip
    out = _run([sys.executable, "-m", "flows.cli", "run", "-j", "2", "--threads", threads],
               root, env)  # fmt: skip
    said = out.stdout + out.stderr
    assert "running 6 stages 2 at a time" in said, said[-3000:]
    ran = sorted(ln.split("'")[1] for ln in said.splitlines() if "] Running stage '" in ln)
    assert ran == ["steering@tiny-a", "steering@tiny-b"], said[-3000:]
    skipped = sorted(ln.split("'")[1] for ln in said.splitlines()
                     if "didn't change, skipping" in ln)  # fmt: skip
    assert skipped == ["decompose@tiny-a", "decompose@tiny-b", "report",
                       "transfer@tiny-a__tiny-b"], said[-3000:]  # fmt: skip
    # side by side: the second steering stage started before the first one finished
    lines = said.splitlines()
    starts = [i for i, ln in enumerate(lines) if "] Running stage 'steering@" in ln]
    ends = [i for i, ln in enumerate(lines) if ln.startswith("[steering@") and "finished in" in ln]
    assert len(starts) == 2 and len(ends) == 2 and starts[1] < ends[0], said[-3000:]
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(tiny_pipeline["lock"]["stages"])
    again, first = out_md5s(lock), out_md5s(tiny_pipeline["lock"])
    differ = {p: (first[p], md5) for p, md5 in again.items() if first[p] != md5}
    files = differing_files(tiny_pipeline["root"], root, list(differ)) if differ else []
    assert not differ, f"outputs differ from dvc repro's: {differ}; files: {files}"
    status = _run(["dvc", "status"], root, env).stdout
    assert "Data and pipelines are up to date" in status, status
