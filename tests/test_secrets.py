"""No secrets in what llmpipe prints, writes or records: a password planted in MLFLOW_TRACKING_URI
(a real MLflow server on 127.0.0.1, which ignores it) and one in a crawl seed."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from test_serve import BIN, Processes, _free_port, _healthy, _wait

from llmpipe.redact import redact

pytestmark = pytest.mark.slow

SECRET = "pl4nted-s3cret"


def test_redact_masks_url_passwords_and_token_query_values():
    assert redact(f"https://bob:{SECRET}@mlflow.example.com:5000/api") == "https://bob:***@mlflow.example.com:5000/api"
    assert redact(f"s3://bucket/a.warc.gz?X-Amz-Signature={SECRET}&part=1") == "s3://bucket/a.warc.gz?X-Amz-Signature=***&part=1"
    for clean in ("sqlite:////tmp/runs/mlflow.db", "http://user@host/page", "http://127.0.0.1:8000/a@b.html?page=2"):
        assert redact(clean) == clean


def test_a_planted_password_reaches_no_log_file_manifest_mlflow_record_or_terminal(tmp_path, capsys, monkeypatch):
    from model_fixtures import MODEL, PRETRAIN, VOCAB, make_run_dir

    from llmpipe import config as configlib
    from llmpipe.cli import main

    port = _free_port()
    (tmp_path / "server-logs").mkdir()
    processes = Processes(tmp_path / "server-logs")
    store = tmp_path / "server"
    store.mkdir()
    try:
        proc = processes.start("mlflow", [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                                          "--workers", "1", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
                                          "--default-artifact-root", str(store / "artifacts")],
                               {**os.environ, "MLFLOW_ENABLE_TELEMETRY": "false"})
        run_dir = make_run_dir(tmp_path / "runs" / "secret")  # tokenizer and shards done: the flow runs pretrain
        config = tmp_path / "secret.yaml"
        config.write_text(configlib.to_yaml({"run": {"name": "secret", "seed": 7}, "tokenizer": {"vocab_size": VOCAB},
                                             "model": MODEL, "pretrain": {**PRETRAIN, "max_steps": 2}}))
        args = ["run", "--config", str(config), "--run-dir", str(run_dir), "--only", "pretrain"]
        assert main(["run", "--config", "configs/tiny.yaml", f"--set=crawl.seeds=[http://crawler:{SECRET}@127.0.0.1:9/]"]) == 2
        err = capsys.readouterr().err
        assert "crawl.seeds=[\"http://crawler:***@127.0.0.1:9/\"]" in err and "carries credentials" in err and SECRET not in err

        url = f"http://127.0.0.1:{port}"
        _wait(lambda: _healthy(url), 120, lambda: f"mlflow server did not start:\n{processes.log('mlflow')}", alive=proc)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://llmpipe:{SECRET}@127.0.0.1:{port}")
        assert main(args) == 0
        out, err = capsys.readouterr()
        assert f"in http://llmpipe:***@127.0.0.1:{port}" in out
        assert SECRET not in out + err

        from mlflow.tracking import MlflowClient

        client = MlflowClient(url)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert {r.data.tags.get("llmpipe.stage") for r in runs} >= {"pretrain"}
        assert any(r.data.metrics.get("train_loss") for r in runs)  # the worker's metrics reached the server
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the server and its workers; its store is SQLite: what it committed stays
        processes.stop_all()
    leaked = [path for root in (tmp_path, Path(os.environ["PREFECT_HOME"])) for path in root.rglob("*")
              if path.is_file() and SECRET.encode() in path.read_bytes()]
    assert leaked == []  # run directory (logs, manifests, job files), the server's store and artifacts, Prefect's database
