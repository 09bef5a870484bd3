"""Schedules against a live `prefect server start` on 127.0.0.1: `llmpipe serve` and `llmpipe deploy`.

The server, `llmpipe serve` and the process worker each run in their own process group, with
their own PREFECT_HOME, and are killed (group and all) when the tests end.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from processes import group_alive

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Processes:
    """Process groups started by a test, all killed at the end."""

    def __init__(self, logs: Path):
        self.logs, self.started = logs, []

    def start(self, name: str, args: list[str], env: dict) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")  # a file, not a pipe nobody reads
        proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.started.append((name, proc))
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]

    def stop_all(self) -> None:
        for _, proc in reversed(self.started):
            _kill_group(proc)
        alive = [name for name, proc in self.started if group_alive(proc.pid)]
        assert alive == [], f"process groups left behind: {alive}"


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while group_alive(proc.pid) and time.monotonic() < deadline:
            proc.poll()  # reap the leader so the group can empty
            time.sleep(0.2)
        if not group_alive(proc.pid):
            break
    proc.poll()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A Prefect server with its own home on a free port; yields its API URL and a client env."""
    home = tmp_path_factory.mktemp("prefect-home")
    url = f"http://127.0.0.1:{_free_port()}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": url, "PYTHONPATH": str(ROOT),
           "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    processes = Processes(tmp_path_factory.mktemp("logs"))
    try:
        server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
        proc = processes.start("server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                          "--port", url.split(":")[-1].split("/")[0]], server_env)
        _wait(lambda: _healthy(url), 180, lambda: f"server did not start:\n{processes.log('server')}",
              alive=proc)
        yield {"url": url, "env": env, "processes": processes}
    finally:
        processes.stop_all()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _wait(check, timeout_s: float, message, alive: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        if alive is not None and alive.poll() is not None:
            break
        time.sleep(0.5)
    raise AssertionError(message())


def _deployment(url: str, name: str) -> dict | None:
    response = httpx.get(f"{url}/deployments/name/llmpipe/{name}", timeout=10)
    return response.json() if response.status_code == 200 else None


def _api(method: str, url: str, **kwargs) -> dict | list:
    """One API call's JSON. The server's SQLite can answer 5xx ("database is locked") while the
    serving process and the worker write to it on 2 busy cores: such a call is tried again."""
    answer = "no answer"
    for attempt in range(10):
        try:
            response = httpx.request(method, url, timeout=30, **kwargs)
        except httpx.TimeoutException:
            answer = "timed out"
        else:
            if response.is_success:
                return response.json()
            answer = f"{response.status_code} {response.text[:500]}"
            if response.status_code < 500:
                break
        time.sleep(1 + attempt)
    raise AssertionError(f"{method} {url}: {answer}")


def _trigger_and_wait(server, deployment: dict, watch: str) -> dict:
    url = server["url"]
    run = _api("POST", f"{url}/deployments/{deployment['id']}/create_flow_run", json={})

    def finished():
        state = _api("GET", f"{url}/flow_runs/{run['id']}")["state"]
        return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

    state = _wait(finished, 150, lambda: f"flow run did not finish:\n{server['processes'].log(watch)}")
    assert state["type"] == "COMPLETED", f"{state}\n{server['processes'].log(watch)}"
    return run


def _task_states(url: str, flow_run_id: str) -> dict[str, str]:
    runs = _api("POST", f"{url}/task_runs/filter", json={"flow_runs": {"id": {"any_": [flow_run_id]}}})
    return {run["name"]: run["state"]["name"] for run in runs}


def _llmpipe(command: str, run_dir: Path, corpus: Path, *extra: str) -> list[str]:
    overrides = [f"tokenizer.input={corpus}", f"shard.input={corpus}", "tokenizer.vocab_size=600",
                 "model.vocab_size=600", "shard.seq_len=64", "shard.tokens_per_shard=4096"]
    return [str(BIN / "llmpipe"), command, "--config", "configs/tiny.yaml", "--run-dir", str(run_dir),
            "--until", "shard", *[arg for o in overrides for arg in ("--set", o)], *extra]


def test_serve_registers_the_schedule_and_its_runs_see_the_site_change(server, tmp_path):
    """`llmpipe serve` of a `crawl.refresh: always` config; two runs triggered through the API with a page
    changed, one added and one removed on the local site between them: the second recrawls and reruns the
    stages whose inputs changed (the tokenizer is kept), and MLflow records both, the second linked to the first."""
    from mlflow.tracking import MlflowClient
    from test_refresh import NEWS, VersionedSite, _config, _documents

    from llmpipe.tracking import EXPERIMENT, tracking_uri

    url = server["url"]
    *bodies, held_back = _site_bodies()
    pages = {f"/page{i}.html": body for i, body in enumerate(bodies)}
    site = VersionedSite(pages)
    run_dir = tmp_path / "runs" / "served"
    try:
        served = server["processes"].start(
            "serve", [str(BIN / "llmpipe"), "serve", "--config", str(_config(tmp_path, site.base)), "--run-dir",
                      str(run_dir), "--until", "shard", "--cron", "0 3 * * *", "--name", "nightly"], server["env"])
        deployment = _wait(lambda: _deployment(url, "nightly"), 120,
                           lambda: f"no deployment:\n{server['processes'].log('serve')}", alive=served)
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * *"]
        assert deployment["parameters"]["until"] == ["shard"]

        first = _trigger_and_wait(server, deployment, "serve")
        stages = {"crawl": "Completed", "prepare": "Completed", "tokenizer": "Completed", "shard": "Completed"}
        assert _task_states(url, first["id"]) == stages
        assert (run_dir / "logs" / "shard.log").is_file()  # runs of a deployment keep per-stage logs too
        before = _documents(run_dir)

        site.change("/page0.html", pages["/page0.html"].replace(b"</article>", NEWS + b"</article>"))
        site.change("/added.html", held_back)
        del site.pages["/page2.html"]
        second = _trigger_and_wait(server, deployment, "serve")
    finally:
        site.close()
    assert _task_states(url, second["id"]) == {**stages, "tokenizer": "Cached"}
    after = _documents(run_dir)
    base = site.base[:-1]
    assert set(after) == set(before) - {base + "/page2.html"} | {base + "/added.html"}
    assert after[base + "/page0.html"] != before[base + "/page0.html"]

    client = MlflowClient(tracking_uri(run_dir.parent))
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    parents = {run.data.tags["prefect.flow_run_id"]: run for run in client.search_runs([experiment])
               if "llmpipe.run_dir" in run.data.tags}
    assert set(parents) == {first["id"], second["id"]}
    assert parents[second["id"]].data.tags["llmpipe.previous_run_id"] == parents[first["id"]].info.run_id


def _site_bodies() -> list[bytes]:
    from test_prepare import _site_pages

    return [body for url, body in _site_pages() if "/page" in url]


def test_deploy_to_a_process_pool_runs_on_a_worker(server, corpus_dir, tmp_path):
    url, env, processes = server["url"], server["env"], server["processes"]
    subprocess.run([str(BIN / "prefect"), "work-pool", "create", "local", "--type", "process"], env=env, cwd=ROOT,
                   check=True, capture_output=True, timeout=120)
    deployed = subprocess.run(_llmpipe("deploy", tmp_path / "pooled", corpus_dir, "--pool", "local",
                                       "--name", "pooled"), env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
    assert deployed.returncode == 0, deployed.stderr[-2000:]
    assert "work pool 'local'" in deployed.stdout
    deployment = _deployment(url, "pooled")
    assert deployment["work_pool_name"] == "local"

    processes.start("worker", [str(BIN / "prefect"), "worker", "start", "--pool", "local"], env)
    run = _trigger_and_wait(server, deployment, "worker")
    assert _task_states(url, run["id"]) == {"tokenizer": "Completed", "shard": "Completed"}
    assert (tmp_path / "pooled" / "shard" / "manifest.json").is_file()
