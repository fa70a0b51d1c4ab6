"""Stages report to shared servers that a user started (README "Scaling out / shared
servers"): a real `mlflow server` and a real `prefect server`, chosen by
MLFLOW_TRACKING_URI and PREFECT_API_URL, checked through each server's own client."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from stages.io import content_hash
from tests._servers import free_port
from tests.backbone.conftest import TINY, run, scratch_project


@pytest.fixture
def tracking_server(mlflow_server, monkeypatch, tmp_path):
    """This process's stages.tracking pointed at the MLflow server, run from tmp_path."""
    import mlflow

    import stages.tracking as tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server["url"])
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    tracking.mlflow_configured.cache_clear()
    yield mlflow_server
    tracking.mlflow_configured.cache_clear()
    mlflow.set_tracking_uri(None)  # MLflow keeps the URI process-wide


@pytest.mark.slow
def test_stage_run_logs_to_the_tracking_server(tracking_server, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow import MlflowClient

    from stages.tracking import stage_run

    data = tmp_path / "input.txt"
    data.write_text("corpus v1\n")
    note = tmp_path / "summary.json"
    note.write_text('{"rows": 3}')
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    with stage_run("scaleout-check", {"saes.k": 4, "corpus.seed": 3}, {"data": data}) as sr:
        sr.metrics({"fvu": 0.25})
        sr.figure(fig, "figures/line.png")
        sr.artifact(note)
        run_id = sr.run_id
    plt.close(fig)

    client = MlflowClient(tracking_uri=tracking_server["url"])
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params == {"saes.k": "4", "corpus.seed": "3"}
    assert got.data.metrics == {"fvu": 0.25}
    assert got.data.tags["dvc.stage"] == "scaleout-check"
    assert got.data.tags["input.data"] == content_hash(data)
    exp = client.get_experiment(got.info.experiment_id)
    assert exp.name == "feature-atlas"

    # Artifacts went through the server (--serve-artifacts): a proxied URI, the bytes in
    # the server's artifacts destination, and nothing written beside the client.
    assert got.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert {a.path for a in client.list_artifacts(run_id)} == {"figures", "summary.json"}
    assert [a.path for a in client.list_artifacts(run_id, "figures")] == ["figures/line.png"]
    back = client.download_artifacts(run_id, "summary.json", str(tmp_path))
    assert Path(back).read_bytes() == note.read_bytes()
    png = Path(client.download_artifacts(run_id, "figures/line.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (stored,) = tracking_server["artifacts"].rglob(f"{run_id}/artifacts/summary.json")
    assert stored.read_bytes() == note.read_bytes()
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()


def test_atlas_ui_points_at_the_shared_server(tracking_server, monkeypatch, capsys):
    import flows.cli

    monkeypatch.setattr(flows.cli, "setup_env", lambda: None)
    assert flows.cli.main(["ui", "mlflow"]) == 0  # returns at once: nothing started
    assert f"mlflow UI on {tracking_server['url']}" in capsys.readouterr().out
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{free_port()}/api")
    assert flows.cli.main(["ui", "prefect"]) == 1
    assert "does not answer" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.slow
def test_stage_flow_reports_to_shared_prefect_and_mlflow_servers(
    tmp_path, prefect_server, mlflow_server
):
    """`python -m flows.corpus` as a user runs it with both variables set: the flow run
    lands on the Prefect server, the stage's MLflow run on the tracking server."""
    from mlflow import MlflowClient
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterId,
    )
    from prefect.client.schemas.objects import StateType

    root = tmp_path / "project"
    root.mkdir()
    # The client's PREFECT_HOME is not the server's: a temporary server started by
    # mistake would write to a database of its own, not to the shared server's.
    client_home = tmp_path / "client-prefect-home"
    env = scratch_project(
        root, TINY, prefect_server, PREFECT_HOME=str(client_home),
        MLFLOW_TRACKING_URI=mlflow_server["url"],
    )  # fmt: skip
    run([sys.executable, "-m", "flows.corpus"], root, env)
    assert (root / "data/corpus").is_dir()
    assert not (client_home / "prefect.db").exists()
    assert not (root / "mlflow.db").exists() and not (root / "mlruns").exists()

    with SyncPrefectClient(api=prefect_server["url"]) as prefect:
        flows = prefect.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["corpus"])))
        assert len(flows) == 1
        assert flows[0].state.type == StateType.COMPLETED
        tasks = prefect.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flows[0].id]))
        )
    assert sorted(t.name.rsplit("-", 1)[0] for t in tasks) == ["generate", "write"]
    assert all(t.state.type == StateType.COMPLETED for t in tasks)

    mlflow = MlflowClient(tracking_uri=mlflow_server["url"])
    exp = mlflow.get_experiment_by_name("feature-atlas")
    (stage,) = mlflow.search_runs([exp.experiment_id], filter_string="tags.`dvc.stage` = 'corpus'")
    assert stage.info.status == "FINISHED"
    assert stage.data.metrics["n_docs"] == TINY["corpus"]["toy"]["n_docs"]
    assert [a.path for a in mlflow.list_artifacts(stage.info.run_id)] == ["meta.json"]
