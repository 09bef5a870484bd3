"""The command surface is a contract: scripts and schedules depend on these names."""

import subprocess
import sys

import pytest

from llmpipe.cli import build_parser
from llmpipe.stages import stage_graph, stage_names


def _llmpipe(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "llmpipe.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_stage_names_keep_their_order():
    # the order comes from the graph: every stage after the stages it reads from
    names = stage_names()
    assert names[:5] == ["crawl", "prepare", "tokenizer", "shard", "pretrain"]
    for name, dependencies in stage_graph().items():
        assert all(names.index(dep) < names.index(name) for dep in dependencies), name


def test_commands():
    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"run", "export", "generate", "chat", "serve", "deploy", "plan", "reproduce", "compare", *stage_names()} == set(commands)
    run_options = {opt for action in commands["run"]._actions for opt in action.option_strings}
    assert {"--config", "--set", "--run-dir", "--until", "--only", "--force", "--verbose"} <= run_options
    deploy_options = {opt for action in commands["deploy"]._actions for opt in action.option_strings}
    assert {"--config", "--pool", "--cron", "--name"} <= deploy_options


def test_until_takes_several_stages():
    args = build_parser().parse_args(["run", "--config", "c.yaml", "--until", "tokenizer,shard"])
    assert args.until == ["tokenizer", "shard"]
    result = _llmpipe("run", "--config", "configs/tiny.yaml", "--until", "shard,nope")
    assert result.returncode == 2 and "unknown stage nope" in result.stderr


@pytest.mark.parametrize("override", ["tokenizer.vocab_size=-5", "tokenizer.bogus=1", "tokenizer.input=/missing"])
def test_bad_config_is_one_line_without_traceback(override, tmp_path):
    result = _llmpipe("run", "--config", "configs/tiny.yaml", "--set", override, "--run-dir", str(tmp_path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert override.split("=")[0] in result.stderr


@pytest.mark.parametrize("command", [["shard"], ["run", "--only", "shard"]])
def test_stage_out_of_order_is_a_clear_error(command, tmp_path):
    result = _llmpipe(*command, "--config", "configs/tiny.yaml", "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "has not completed" in result.stderr and "Traceback" not in result.stderr


def test_serve_without_server_says_how(tmp_path):
    env_free = subprocess.run(
        [sys.executable, "-m", "llmpipe.cli", "serve", "--config", "configs/tiny.yaml", "--cron", "0 3 * * *"],
        capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "PREFECT_HOME": str(tmp_path),
                                             "PREFECT_API_URL": "http://127.0.0.1:9/api"})
    assert env_free.returncode == 2
    assert "prefect server start" in env_free.stderr


@pytest.mark.parametrize("command", ["run", "export", "generate", "serve", "deploy", "tokenizer"])
def test_help(command):
    result = _llmpipe(command, "--help")
    assert result.returncode == 0 and "usage: llmpipe" in result.stdout
