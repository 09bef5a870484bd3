"""The stage graph: planning, method gating, precise code versions, and the flow as a Prefect DAG.

Flow tests run toy stages (tests/toy_stages.py, tests/toy_model_stages.py) through the real
Prefect engine and read the task runs back from its API.
"""

from __future__ import annotations

import multiprocessing
import shutil
import signal
import threading
import time

import pytest

from llmpipe import code_version, stages
from llmpipe import config as configlib
from llmpipe.data import prepare
from llmpipe.paths import RunDir
from llmpipe.stages import Input, Stage

TOYS = {stage.name: stage for stage in [
    Stage("source", "toy_stages:source", ("tokenizer",)),
    Stage("left", "toy_stages:branch", ("shard",), inputs={"source": Input("source")}),
    Stage("right", "toy_stages:branch", ("shard",), inputs={"source": Input("source")}),
    Stage("join", "toy_stages:source", ("tokenizer",), inputs={"left": Input("left"), "right": Input("right")}),
    Stage("train", "toy_model_stages:train", ("model",), inputs={"source": Input("source")}),
    Stage("evaluate", "toy_model_stages:evaluate", ("model",),
          inputs={"model": Input("train"), "tuned": Input("tuned")}),
    Stage("tuned", "toy_model_stages:evaluate", ("model",), inputs={"model": Input("train")}, methods=("dpo",)),
]}


@pytest.fixture
def toys(monkeypatch):
    monkeypatch.setattr(stages, "STAGES", TOYS)


def _config(tmp_path, **run):
    return configlib.validate({"run": {"run_dir": str(tmp_path / "run"), **run}})


# --- the graph ---------------------------------------------------------------------------------


def test_order_comes_from_the_graph(toys):
    names = stages.stage_names()
    # registry order, except that a stage waits for what it reads: evaluate is registered before tuned
    assert names == ["source", "left", "right", "join", "train", "tuned", "evaluate"]


def test_until_several_stages_plans_what_they_need(toys, tmp_path):
    config = _config(tmp_path)
    assert stages.plan_stages(config, ["left", "train"]) == ["source", "left", "train"]
    assert stages.plan_stages(config, "join") == ["source", "left", "right", "join"]
    with pytest.raises(stages.StageError, match="'left' has not completed"):
        stages.plan_stages(config, only="join")  # --only takes its inputs from the run directory
    for name in ("left", "right"):
        RunDir(config.run_dir).manifest(name).parent.mkdir(parents=True)
        RunDir(config.run_dir).manifest(name).write_text("{}")
    assert stages.plan_stages(config, only="join") == ["join"]


def test_external_inputs_are_hashed_once_per_run(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("alpha")
    stage = Stage("toy", "toy_stages:source", ("tokenizer",),
                  inputs={"train": Input(field="tokenizer.input"), "extra": Input(field="shard.input")})
    monkeypatch.setattr(stages, "STAGES", {"toy": stage, **stages.STAGES})
    config = configlib.validate({"run": {"run_dir": str(tmp_path / "run")},
                                 "tokenizer": {"input": str(corpus)}, "shard": {"input": str(corpus)}})
    hashed = []
    real = stages.directory_fingerprint
    monkeypatch.setattr(stages, "directory_fingerprint", lambda path: hashed.append(path) or real(path))
    external = stages.external_fingerprints(config, ["toy", "tokenizer", "shard"])
    prints = {name: stages.input_fingerprints(stages.STAGES[name], config, external) for name in ("toy", "tokenizer")}
    assert hashed == [corpus]  # four inputs of three stages name one folder: it is hashed once
    assert prints["toy"] == {"train": real(corpus), "extra": real(corpus)}
    assert stage.input_paths(config) == {"train": corpus, "extra": corpus}


def test_a_method_that_is_off_takes_its_stage_out_of_the_graph(toys, tmp_path):
    on = configlib.validate({"run": {"run_dir": str(tmp_path)}, "align": {"methods": ["dpo"]}})
    off = configlib.validate({"run": {"run_dir": str(tmp_path)}, "align": {"methods": ["ppo"]}})
    assert stages.stage_graph(on)["evaluate"] == ("train", "tuned")
    assert "tuned" not in stages.stage_graph(off)
    assert stages.stage_graph(off)["evaluate"] == ("train",)  # evaluates the models that exist
    assert stages.plan_stages(off, "evaluate") == ["source", "train", "evaluate"]
    assert set(TOYS["evaluate"].input_paths(off)) == {"model"}
    with pytest.raises(stages.StageError, match="'tuned' is off.*dpo"):
        stages.plan_stages(off, ["tuned"])


def test_an_input_only_the_config_can_give_must_be_set(tmp_path):
    stage = Stage("toy", "toy_stages:source", ("tokenizer",), inputs={"data": Input(field="tokenizer.input")})
    with pytest.raises(stages.StageError, match="needs tokenizer.input"):
        stages.input_fingerprints(stage, _config(tmp_path))


def test_a_cycle_is_reported(monkeypatch):
    monkeypatch.setattr(stages, "STAGES", {"a": Stage("a", "x:y", (), inputs={"b": Input("b")}),
                                           "b": Stage("b", "x:y", (), inputs={"a": Input("a")})})
    with pytest.raises(stages.StageError, match="cycle"):
        stages.stage_names()


def test_align_methods_are_checked():
    with pytest.raises(configlib.ConfigError, match="align.methods.0=\"sft\".*'dpo' or 'ppo'"):
        configlib.validate({"align": {"methods": ["sft"]}})
    assert configlib.RunConfig().align.methods == ["dpo", "ppo"]


# --- code versions -----------------------------------------------------------------------------


@pytest.fixture
def source_copy(tmp_path):
    """A copy of the llmpipe package to edit: the real tree is never touched."""
    root = tmp_path / "src"
    shutil.copytree(code_version.SOURCE_ROOT / "llmpipe", root / "llmpipe",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _versions(root):
    return {name: stages.code_version(stage, root) for name, stage in stages.STAGES.items()}


def _edit(path):
    path.write_text(path.read_text() + "\n# edited\n")


def test_code_version_covers_what_a_stage_imports(source_copy):
    before = _versions(source_copy)
    assert before == _versions(code_version.SOURCE_ROOT)  # the copy has the same version: paths are relative

    (source_copy / "llmpipe/training/dpo.py").write_text("import llmpipe.model.model\n")
    for edited in ("generate.py", "cli.py", "config/__init__.py", "config/training.py", "console.py"):
        _edit(source_copy / "llmpipe" / edited)
    assert _versions(source_copy) == before

    _edit(source_copy / "llmpipe/model/model.py")
    after = _versions(source_copy)
    assert after["pretrain"] != before["pretrain"]
    assert {name for name in before if after[name] == before[name]} == {"crawl", "prepare", "tokenizer", "shard",
                                                                        "instruct"}

    _edit(source_copy / "llmpipe/model/generate.py")  # greedy answers: SFT's task accuracy, not pretraining
    edited = _versions(source_copy)
    assert edited["sft"] != after["sft"] and edited["pretrain"] == after["pretrain"]

    _edit(source_copy / "llmpipe/data/_crawl_scrapy.py")  # started as `python -m`, listed in the registry
    assert _versions(source_copy)["crawl"] != before["crawl"]


def test_closure_follows_imports_in_functions_and_skips_the_main_guard(tmp_path):
    package = tmp_path / "llmpipe"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from llmpipe import b\n\nif __name__ == '__main__':\n"
                                  "    import llmpipe.c\n")
    (package / "b.py").write_text("from . import d\n")
    for name in ("c", "d"):
        (package / f"{name}.py").write_text("")
    files = {p.name for p in code_version.module_closure(["llmpipe.a"], tmp_path)}
    assert files == {"__init__.py", "a.py", "b.py", "d.py"}


# --- signal handling off the main thread ---------------------------------------------------------


def _report_sigterm(conn):
    conn.send(signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)


def test_forked_workers_get_default_sigterm_from_a_worker_thread():
    """Prefect turns SIGTERM into an exception; prepare's pool workers must still die on it."""
    def raise_on_term(signum, frame):
        raise SystemExit("terminated")

    previous = signal.signal(signal.SIGTERM, raise_on_term)
    results = []

    def in_thread():
        fork = multiprocessing.get_context("fork")
        for reset in (False, True):
            receive, send = fork.Pipe(duplex=False)
            context = prepare._default_sigterm() if reset else _nothing()
            with context:
                child = fork.Process(target=_report_sigterm, args=(send,))
                child.start()
            results.append(receive.recv())
            child.join()

    try:
        thread = threading.Thread(target=in_thread)
        thread.start()
        thread.join()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert results == [False, True]


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --- the flow as a Prefect DAG -------------------------------------------------------------------


def _flow(tmp_path, until, overrides=(), **kwargs):
    from flows.pipeline import pipeline

    return pipeline(config_path="configs/tiny.yaml", overrides=["run.name=dag", *overrides],
                    run_dir=str(tmp_path / "run"), until=until, **kwargs)


def _task_runs(flow_run_id):
    """name -> task run, read back from Prefect's API once every run has reached a final state."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        for _ in range(60):
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            if runs and all(run.state is not None and run.state.is_final() for run in runs):
                break
            time.sleep(0.5)
    return {run.name: run for run in runs}


def _artifacts(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def _overlap(a, b) -> bool:
    return a.start_time < b.end_time and b.start_time < a.end_time


@pytest.mark.slow
def test_task_runs_form_the_graph_and_branches_overlap(toys, tmp_path):
    summary = _flow(tmp_path, ["join"], ["run.max_parallel_stages=2"])
    assert summary["stages"] == {name: "ran" for name in ["source", "left", "right", "join"]}
    runs = _task_runs(summary["flow_run_id"])
    ids = {run.id: name for name, run in runs.items()}
    upstream = {name: sorted(ids[ref.id] for ref in run.task_inputs.get("wait_for", [])) for name, run in runs.items()}
    assert upstream == {"source": [], "left": ["source"], "right": ["source"], "join": ["left", "right"]}
    assert _overlap(runs["left"], runs["right"])
    assert not _overlap(runs["source"], runs["left"])
    artifacts = _artifacts(summary["flow_run_id"])
    assert {artifact.task_run_id: artifact.key for artifact in artifacts} == {
        runs[name].id: f"dag-{name}" for name in ["source", "left", "right", "join"]}

    one_at_a_time = _flow(tmp_path, ["join"], ["run.max_parallel_stages=1", "shard.seq_len=99"])
    runs = _task_runs(one_at_a_time["flow_run_id"])
    assert one_at_a_time["stages"] == {"source": "cached", "left": "ran", "right": "ran", "join": "ran"}
    assert not _overlap(runs["left"], runs["right"])


@pytest.mark.slow
def test_a_failed_branch_fails_the_flow_and_the_other_branch_finishes(toys, tmp_path, monkeypatch):
    monkeypatch.setenv("TOY_FAIL", "right")
    with pytest.raises(stages.StagesFailed, match="right failed"):
        _flow(tmp_path, ["join"])
    run_dir = RunDir(tmp_path / "run")
    assert run_dir.manifest("left").is_file() and not run_dir.manifest("right").exists()
    assert not run_dir.stage("join").exists()
    assert "right was told to fail" in run_dir.stage_log("right").read_text()

    monkeypatch.delenv("TOY_FAIL")
    summary = _flow(tmp_path, ["join"])
    assert summary["stages"] == {"source": "cached", "left": "cached", "right": "ran", "join": "ran"}


@pytest.mark.slow
def test_model_code_reruns_training_and_what_follows_only(toys, tmp_path, source_copy, monkeypatch):
    monkeypatch.setattr(code_version, "SOURCE_ROOT", source_copy)
    until = ["evaluate"]
    assert set(_flow(tmp_path, until)["stages"].values()) == {"ran"}
    (source_copy / "llmpipe/training/dpo.py").write_text("import llmpipe.model.model\n")
    assert set(_flow(tmp_path, until)["stages"].values()) == {"cached"}

    _edit(source_copy / "llmpipe/model/model.py")
    summary = _flow(tmp_path, until)
    assert summary["stages"] == {"source": "cached", "train": "ran", "tuned": "ran", "evaluate": "ran"}

    # outputs that no longer match the cache record (here: a lost manifest) make the stage run again
    RunDir(tmp_path / "run").manifest("source").unlink()
    assert _flow(tmp_path, until, only="source")["stages"] == {"source": "ran"}
