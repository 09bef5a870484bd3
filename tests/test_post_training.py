"""SFT, the DPO reference cache, DPO, the reward model and PPO/GRPO as stages on a tiny CPU model:
caching, exact resume, a file killed while written, 2 processes against 1, and what their
numbers mean."""

import json
import math
import os

import pyarrow as pa
import pytest
import torch
from model_fixtures import MODEL, PRETRAIN, VOCAB, make_run_dir
from safetensors.torch import load_file

from llmpipe import stages
from llmpipe.alignment.dpo_reference import HELDOUT_FILE, TRAIN_FILE, read_table
from llmpipe.config import validate
from llmpipe.io import ChecksumError
from llmpipe.paths import RunDir

POST_MODEL = {**MODEL, "seq_len": 96}
TRAIN = dict(batch_tokens=4 * 96, micro_batch_size=2, warmup_steps=1, eval_every=3, checkpoint_every=3,
             log_every=2, peak_flops=1e11)
SECTIONS = {
    "instruct": {"doc_examples": 0, "task_examples": 120, "tasks": ["add", "reverse", "uppercase"]},
    "sft": {**TRAIN, "max_steps": 6, "lr": 3e-3, "eval_prompts": 8, "max_new_tokens": 8},
    "dpo": {**TRAIN, "max_steps": 6, "lr": 1e-3},
    "reward": {**TRAIN, "max_steps": 6, "lr": 1e-3},
    # 4 prompts per rollout, 4 responses per step, 2 epochs: steps 1-2 serve rollout 0, 3-4 rollout 1, ...
    "ppo": {**TRAIN, "max_steps": 6, "lr": 1e-3, "rollout_prompts": 4, "epochs": 2, "max_new_tokens": 8,
            "generation_batch_size": 4, "eval_prompts": 8},
    "eval": {"eval_prompts": 8, "max_new_tokens": 8, "ngram": 4, "limit": 20, "batch_size": 8},
}


def config_for(run_dir, **overrides):
    tree = {"run": {"name": "t", "seed": 7, "run_dir": str(run_dir)}, "tokenizer": {"vocab_size": VOCAB},
            "model": POST_MODEL, "pretrain": {**PRETRAIN, "batch_tokens": 2 * 96, "max_steps": 4},
            "align": {"methods": ["dpo", "ppo"]}, **{k: dict(v) for k, v in SECTIONS.items()}}
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        tree[section][key] = value
    return validate(tree)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """tokenizer, shards, a 4-step pretrained model and the instruction data: what sft reads."""
    run_dir = make_run_dir(tmp_path_factory.mktemp("post") / "run")
    config = config_for(run_dir)
    for name in ("pretrain", "instruct"):
        stages.execute(name, config)
    return run_dir


@pytest.fixture(scope="module")
def sft_run(base_run):
    stages.execute("sft", config_for(base_run))
    return base_run


@pytest.fixture(scope="module")
def dpo_run(sft_run):
    config = config_for(sft_run)
    for name in ("dpo_reference", "dpo"):
        stages.execute(name, config)
    return sft_run


@pytest.fixture(scope="module")
def reward_run(sft_run):
    stages.execute("reward", config_for(sft_run))
    return sft_run


@pytest.fixture(scope="module")
def ppo_run(reward_run):
    stages.execute("ppo", config_for(reward_run))
    return reward_run


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def _same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sft_reports_heldout_loss_and_task_accuracy_of_both_models(sft_run):
    counts = json.loads(RunDir(sft_run).manifest("sft").read_text())["counts"]
    assert counts["steps"] == 6 and counts["examples"] > 0 and counts["rows"] < counts["examples"]  # packed
    assert counts["heldout_loss"] < counts["heldout_loss_base"]  # six steps already lower it
    assert 0 <= counts["task_accuracy"] <= 1 and 0 <= counts["task_accuracy_base"] <= 1
    assert counts["task_prompts"] == 8


def _copy_run(run_dir, to, without=()):
    """A copy of a run directory, minus the stage folders `without` (their stages then run again)."""
    import fnmatch
    import shutil

    def top_level(folder, names):
        return [n for n in names if folder == str(run_dir) and any(fnmatch.fnmatch(n, w) for w in without)]

    shutil.copytree(run_dir, to, ignore=top_level)
    return to


def _killed_then_resumed(name, config, fault):
    """Run stage `name` with `LLMPIPE_FAULT=fault` (its worker SIGKILLed), then again: the resumed run's counts."""
    from llmpipe.distributed.launch import WorkerFailed

    os.environ["LLMPIPE_FAULT"] = fault
    try:
        with pytest.raises(WorkerFailed, match="SIGKILL"):
            stages.execute(name, config)
    finally:
        del os.environ["LLMPIPE_FAULT"]
    assert not RunDir(config.run_dir).manifest(name).exists()
    return stages.execute(name, config).manifest["counts"]


def test_sft_killed_midway_resumes_to_the_uninterrupted_weights(sft_run, tmp_path):
    run_dir = _copy_run(sft_run, tmp_path / "run", without=("sft", "dpo*"))
    counts = _killed_then_resumed("sft", config_for(run_dir), "sft:step_4")  # SIGKILL after step 4's update
    assert counts["resumed_from_step"] == 3 and counts["steps"] == 6  # checkpoint_every 3
    assert _same_weights(RunDir(run_dir).stage("sft"), RunDir(sft_run).stage("sft"))
    assert counts["heldout_loss"] == json.loads(RunDir(sft_run).manifest("sft").read_text())["counts"]["heldout_loss"]


def test_dpo_reference_cache_and_dpo(dpo_run):
    run = RunDir(dpo_run)
    reference = json.loads(run.manifest("dpo_reference").read_text())
    table = read_table(run.stage("dpo_reference"), TRAIN_FILE)
    assert table.schema.names == ["index", "chosen_logp", "rejected_logp"]
    assert table.schema.field("index").type == pa.int64() and table.schema.field("chosen_logp").type == pa.float64()
    assert table.num_rows == reference["counts"]["train_pairs"] > 0
    assert {TRAIN_FILE, HELDOUT_FILE} <= set(reference["files"])
    dpo = json.loads(run.manifest("dpo").read_text())["counts"]
    assert dpo["steps"] == 6 and 0 <= dpo["pref_accuracy"] <= 1
    assert dpo["pref_accuracy_sft"] == reference["counts"]["heldout_pref_accuracy"]


def test_dpo_killed_midway_resumes_to_the_uninterrupted_weights(dpo_run, tmp_path):
    run_dir = _copy_run(dpo_run, tmp_path / "run", without=("dpo",))
    counts = _killed_then_resumed("dpo", config_for(run_dir), "dpo:step_5")
    assert counts["resumed_from_step"] == 3 and counts["steps"] == 6
    assert _same_weights(RunDir(run_dir).stage("dpo"), RunDir(dpo_run).stage("dpo"))
    assert counts["pref_accuracy"] == json.loads(RunDir(dpo_run).manifest("dpo").read_text())["counts"]["pref_accuracy"]


def test_changing_beta_or_lr_reruns_dpo_alone(sft_run):
    base = config_for(sft_run)
    for override in ({"dpo.beta": 0.5}, {"dpo.lr": 5e-4}):
        changed = config_for(sft_run, **override)
        for name, rerun in (("dpo_reference", False), ("dpo", True)):
            stage = stages.get_stage(name)
            same = stages.config_hash(stage, base) == stages.config_hash(stage, changed)
            assert same != rerun, (override, name)


def test_dpo_reference_killed_while_writing_leaves_no_file_and_reruns_to_the_same_bytes(sft_run):
    from llmpipe.distributed.launch import WorkerFailed

    config, run = config_for(sft_run), RunDir(sft_run)
    stages.execute("dpo_reference", config)
    before = (run.stage("dpo_reference") / TRAIN_FILE).read_bytes()
    os.environ["LLMPIPE_FAULT"] = "dpo_reference:wrote_reference_logps"  # SIGKILL the worker before its rename
    try:
        with pytest.raises(WorkerFailed, match="SIGKILL"):
            stages.execute("dpo_reference", config)
    finally:
        del os.environ["LLMPIPE_FAULT"]
    folder = run.stage("dpo_reference")
    assert not (folder / "manifest.json").exists() and not (folder / TRAIN_FILE).exists()
    stages.execute("dpo_reference", config)
    assert (folder / TRAIN_FILE).read_bytes() == before


def test_a_flipped_byte_in_the_reference_cache_is_never_trained_on(sft_run, tmp_path):
    import shutil

    folder = tmp_path / "dpo_reference"
    shutil.copytree(RunDir(sft_run).stage("dpo_reference"), folder)
    data = bytearray((folder / TRAIN_FILE).read_bytes())
    data[len(data) // 2] ^= 1
    (folder / TRAIN_FILE).write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        read_table(folder, TRAIN_FILE)


def _max_weight_difference(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", ["sft", "dpo", "reward", "ppo"])
def test_two_fsdp_processes_train_what_one_process_trains(dpo_run, ppo_run, tmp_path, name):
    """torchrun with FSDP on 2 processes (each a half of every global batch, PPO's rollouts split
    between them) against one process."""
    without = ("sft", "dpo*", "reward", "ppo") if name == "sft" else ("reward", "ppo") if name == "reward" else (name,)
    run_dir = _copy_run(dpo_run, tmp_path / "run", without=without)
    config = config_for(run_dir, **{f"{name}.nproc": 2, f"{name}.parallel": {"strategy": "fsdp"}})
    counts = stages.execute(name, config).manifest["counts"]
    single = json.loads(RunDir(dpo_run).manifest(name).read_text())["counts"]
    assert counts["steps"] == single["steps"] == 6
    diff = _max_weight_difference(RunDir(run_dir).stage(name), RunDir(dpo_run).stage(name))
    tolerance = 1e-4 if name == "ppo" else 1e-5  # PPO: the rollouts are scored in other batches
    assert diff < tolerance
    metric = {"sft": "heldout_loss", "dpo": "pref_accuracy", "reward": "heldout_pairwise_accuracy",
              "ppo": "last_rollout.score_mean"}[name]
    assert counts[metric] == pytest.approx(single[metric], abs=tolerance)


def test_the_reward_model_is_a_score_model_with_heldout_accuracy_and_margin(reward_run):
    run = RunDir(reward_run)
    counts = json.loads(run.manifest("reward").read_text())["counts"]
    assert counts["steps"] == 6 and counts["heldout_pairs"] > 0
    assert 0 <= counts["heldout_pairwise_accuracy"] <= 1 and counts["heldout_loss"] > 0
    weights = _weights(run.stage("reward"))
    assert weights["score.weight"].shape == (1, POST_MODEL["d_model"]) and "lm_head.weight" not in weights
    assert json.loads((run.stage("reward") / "model_config.json").read_text())["head"] == "score"
    sft = _weights(run.stage("sft"))
    assert not torch.equal(weights["norm_f.weight"], sft["norm_f.weight"])  # trained from SFT's body


def test_a_reward_model_cannot_chat(reward_run):
    from llmpipe.errors import BadValue
    from llmpipe.generate import load_stage_model

    with pytest.raises(BadValue, match="score model"):
        load_stage_model(reward_run, "reward")


def test_reward_killed_midway_resumes_to_the_uninterrupted_weights(reward_run, tmp_path):
    run_dir = _copy_run(reward_run, tmp_path / "run", without=("reward",))
    counts = _killed_then_resumed("reward", config_for(run_dir), "reward:step_4")
    assert counts["resumed_from_step"] == 3 and counts["steps"] == 6
    assert _same_weights(RunDir(run_dir).stage("reward"), RunDir(reward_run).stage("reward"))
    single = json.loads(RunDir(reward_run).manifest("reward").read_text())["counts"]
    assert counts["heldout_pairwise_accuracy"] == single["heldout_pairwise_accuracy"]


def test_the_exported_reward_model_scores_as_ours_in_transformers(reward_run, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from llmpipe.alignment.render import ChatEncoder, score_batch, scores_at
    from llmpipe.export import export_hf
    from llmpipe.model.release import load_release
    from llmpipe.tokenizer.train import load_tokenizer

    run = RunDir(reward_run)
    out = export_hf(reward_run, "reward", tmp_path / "hf")
    hf = AutoModelForSequenceClassification.from_pretrained(out, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    encoder = ChatEncoder(load_tokenizer(run.tokenizer_dir))
    conversations = [[{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}],
                     [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Reverse abc"},
                      {"role": "assistant", "content": "cba"}]]
    ids = [encoder.conversation(c).ids for c in conversations]
    assert [tokenizer.apply_chat_template(c, tokenize=True, return_dict=False) for c in conversations] == ids
    batch = score_batch(ids)  # right-padded with the pad id, which transformers skips
    with torch.no_grad():
        ours = scores_at(load_release(run.stage("reward"))(batch["input_ids"]), batch["last"])
        theirs = hf(input_ids=batch["input_ids"], attention_mask=(batch["input_ids"] != hf.config.pad_token_id).long())
    assert hf.config.num_labels == 1 and theirs.logits.shape == (2, 1)
    torch.testing.assert_close(theirs.logits[:, 0], ours, rtol=0, atol=1e-4)


def test_ppo_reports_rollouts_and_heldout_answers_of_sft_and_ppo(ppo_run):
    run = RunDir(ppo_run)
    manifest = json.loads(run.manifest("ppo").read_text())
    counts = manifest["counts"]
    assert counts["steps"] == 6 and counts["rollouts"] == 3 and counts["steps_per_rollout"] == 2
    assert counts["heldout_prompts"] == 8 and counts["heldout_kl"] >= 0
    for key in ("rm_score", "rm_score_sft", "task_accuracy", "task_accuracy_sft"):
        assert math.isfinite(counts[key])
    assert 1 <= counts["last_rollout.response_length"] <= 8 and counts["last_rollout.kl_k3"] >= 0
    assert counts["rm_score"] != counts["rm_score_sft"]  # the policy moved: its greedy answers score otherwise
    # the release is the policy, a language model of SFT's shape that chat and export take
    weights, sft = _weights(run.stage("ppo")), _weights(run.stage("sft"))
    assert weights.keys() == sft.keys() and not all(torch.equal(weights[k], sft[k]) for k in weights)
    from llmpipe.generate import load_stage_model

    model, _ = load_stage_model(ppo_run, "ppo")
    assert model.head == "lm"


def test_ppo_killed_mid_rollout_resumes_to_the_uninterrupted_weights(ppo_run, tmp_path):
    """Killed after step 4, the second step of rollout 1: the step-3 checkpoint holds that
    rollout's buffer half served, and the rerun trains on the same responses."""
    run_dir = _copy_run(ppo_run, tmp_path / "run", without=("ppo",))
    counts = _killed_then_resumed("ppo", config_for(run_dir), "ppo:step_4")
    assert counts["resumed_from_step"] == 3 and counts["steps"] == 6
    saved = json.loads((RunDir(run_dir).stage("ppo") / "checkpoints" / "step_0000003" / "state.json").read_text())
    assert saved["loader"]["rollout"] == 2 and saved["loader"]["served"] == 4  # rollout 1, half of 2 epochs x 4
    assert _same_weights(RunDir(run_dir).stage("ppo"), RunDir(ppo_run).stage("ppo"))
    single = json.loads(RunDir(ppo_run).manifest("ppo").read_text())["counts"]
    assert counts["rm_score"] == single["rm_score"] and counts["heldout_kl"] == single["heldout_kl"]


def test_grpo_with_the_checker_trains_the_policy_alone(reward_run, tmp_path):
    run_dir = _copy_run(reward_run, tmp_path / "run", without=("ppo",))
    config = config_for(run_dir, **{"ppo.advantage": "grpo", "ppo.reward": "checker", "ppo.group_size": 4,
                                    "ppo.rollout_prompts": 2, "ppo.epochs": 1})
    counts = stages.execute("ppo", config).manifest["counts"]
    assert counts["steps"] == 6 and counts["steps_per_rollout"] == 2 and counts["rollouts"] == 3
    assert 0 <= counts["last_rollout.score_mean"] <= 1  # checker rewards: the share of right replies
    assert not any(key.startswith("critic") for key in _weights(RunDir(run_dir).stage("ppo")))


def test_the_exported_ppo_policy_is_a_causal_lm_with_our_logits(ppo_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from llmpipe.export import export_hf
    from llmpipe.model.release import load_release

    out = export_hf(ppo_run, "ppo", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    ids = torch.tensor([[0, 5, 17, 42, 3, 99]])
    with torch.no_grad():
        ours = load_release(RunDir(ppo_run).stage("ppo"))(ids)
        theirs = hf(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


# --- the eval stage on every model of this run ---------------------------------------------------------


def _fake_data_stages(run_dir, planted: str) -> None:
    """crawl and prepare 'completed': a documents folder in which one page copies `planted`, a
    held-out question with its answer, and manifests with the funnel's counts."""
    import gzip

    from llmpipe import io

    run = RunDir(run_dir)
    rows = [{"text": f"A page about topic {i}: nothing here is a question from the evaluation sets.", "id": f"d{i}",
             "metadata": {"url": f"http://127.0.0.1:8000/page{i}.html"}} for i in range(6)]
    rows.insert(3, {"text": f"Copied from a quiz: {planted} That was the quiz.", "id": "leak",
                    "metadata": {"url": "http://127.0.0.1:8000/leak.html"}})
    documents = run.documents_dir / "00000.jsonl.gz"
    documents.parent.mkdir(parents=True, exist_ok=True)
    documents.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode(), mtime=0))
    refresh = {"refresh.new": 1, "refresh.changed": 2, "refresh.unchanged": 6, "refresh.removed": 3}  # a refreshed crawl
    for name, counts in (("crawl", {"pages_fetched": 9, **refresh}),
                         ("prepare", {"pages_in": 9, "kept_after.language": 8, "kept_after.minhash": 7, "documents": 7})):
        files = {str(p.relative_to(run.stage(name))): {"sha256": io.sha256_file(p)} for p in run.stage(name).rglob("*.gz")}
        io.write_json(run.manifest(name), {"stage": name, "files": files, "fingerprint": f"{name}-fake", "counts": counts,
                                           "config_hash": f"{name}-config", "code_version": f"{name}-code"})


@pytest.fixture(scope="module")
def eval_run(ppo_run, dpo_run):
    from llmpipe.alignment.data import RowCounts, load_prompts

    prompt = load_prompts([RunDir(ppo_run).prompts_heldout_file], RowCounts("t"))[0]
    _fake_data_stages(ppo_run, f"{prompt.prompt[-1]['content']} {prompt.answer}")
    stages.execute("eval", config_for(ppo_run))
    return ppo_run, prompt


def test_eval_reports_every_checkpoint_of_the_graph(eval_run):
    run_dir, _ = eval_run
    run = RunDir(run_dir)
    card = json.loads(run.report_json.read_text())
    assert set(card["checkpoints"]) == {"pretrain", "sft", "dpo", "ppo", "reward"}
    for name in ("pretrain", "sft", "dpo", "ppo"):
        entry = card["checkpoints"][name]
        for key in ("val_loss", "val_bpb", "task_accuracy", "pref_accuracy", "rm_score"):
            assert math.isfinite(entry[key]), (name, key)
        # bits per byte: the same summed nats over the bytes the scored tokens decode to
        assert entry["val_bpb"] == pytest.approx(entry["val_loss"] * entry["val_tokens"] / entry["val_bytes"] / math.log(2))
        task = entry["tasks"]["instruct_choice"]
        assert set(task) >= {"acc", "acc_norm", "stderr", "n", "n_contaminated"} and 0 < task["n"] <= 20
        assert len(entry["examples"]) == 3
    assert "stdlib_objects" not in card["checkpoints"]["sft"]["tasks"]  # no documentation questions in this run
    assert 0 <= card["checkpoints"]["reward"]["pairwise_accuracy"] <= 1 and card["checkpoints"]["reward"]["n"] > 0
    assert math.isfinite(card["baselines"]["unigram_bpb"])
    assert card["baselines"]["chance"]["instruct_choice"] == pytest.approx(0.25, abs=0.1)
    assert card["funnel"] == {"pages_crawled": 9, "pages_new": 1, "pages_changed": 2, "pages_unchanged": 6,
                              "pages_removed": 3, "pages_extracted": 9, "after_language": 8, "after_minhash": 7,
                              "documents": 7}  # this run's shard stage is a stand-in without counts
    for name in ("pretrain", "sft", "dpo", "reward", "ppo", "instruct"):
        manifest = json.loads(run.manifest(name).read_text())
        assert card["stages"][name]["config_hash"] == manifest["config_hash"]
        assert card["stages"][name]["wall_s"] > 0
    assert card["registry"] == {"registered": False, "reason": "the run is not tracked (no MLflow run for this stage)"}
    plots = sorted(p.name for p in (run.eval_dir / "plots").iterdir())
    assert plots == ["dpo.png", "ppo.png", "pretrain.png", "reward.png", "sft.png"]
    assert all((run.eval_dir / "plots" / p).read_bytes()[:4] == b"\x89PNG" for p in plots)
    markdown = run.report_md.read_text()
    assert "| model | val loss | val bpb |" in markdown and "![sft](plots/sft.png)" in markdown


def test_eval_killed_while_writing_its_report_reruns_to_the_same_report(eval_run, tmp_path):
    run_dir = _copy_run(eval_run[0], tmp_path / "run", without=("eval",))
    counts = _killed_then_resumed("eval", config_for(run_dir), "write:report.json")
    assert counts["unigram_bpb"] == json.loads(RunDir(eval_run[0]).manifest("eval").read_text())["counts"]["unigram_bpb"]
    for name in ("report.json", "report.md", "plots/sft.png"):
        assert (RunDir(run_dir).eval_dir / name).read_bytes() == (RunDir(eval_run[0]).eval_dir / name).read_bytes()


def test_eval_flags_the_planted_item_by_its_page(eval_run):
    run_dir, prompt = eval_run
    card = json.loads(RunDir(run_dir).report_json.read_text())
    prompts = card["contamination"]["sets"]["heldout_prompts"]
    assert prompts["examples"][0] == {"id": str(prompt.index), "source": "http://127.0.0.1:8000/leak.html"}
    assert 1 <= prompts["n_contaminated"] < prompts["n"]  # the clean ones are not flagged
    task = card["checkpoints"]["sft"]["tasks"]["instruct_choice"]
    if task["n_contaminated"]:  # the planted question is among the task's first 20 items
        assert task["n_clean"] == task["n"] - task["n_contaminated"]


def test_eval_in_the_flow_publishes_the_report_and_crowns_a_champion_that_generates(eval_run, tmp_path):
    """The real Prefect engine and MLflow store: the report on the flow's run and as a Prefect
    artifact, the chat model registered with the alias `champion`; a rerun is cached and registers
    nothing. The run was moved: its report is the first one's but for the registry."""
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client

    from flows.pipeline import pipeline
    from llmpipe.config import dump
    from llmpipe.eval.registry import load_champion
    from llmpipe.tracking import tracking_uri

    run_dir = _copy_run(eval_run[0], tmp_path / "runs" / "t", without=("eval",))
    config_path = tmp_path / "t.yaml"
    config_path.write_text(dump(config_for(run_dir)))
    summary = pipeline(config_path=str(config_path), run_dir=str(run_dir), only="eval")
    assert summary["stages"] == {"eval": "ran"}
    registry = json.loads(RunDir(run_dir).report_json.read_text())["registry"]
    assert registry["registered"] and registry["promoted"] and registry["version"] == registry["champion_version"] == 1
    assert registry["model_name"] == "llmpipe-t" and registry["reason"] == "first version: no champion yet"
    uri = tracking_uri(run_dir.parent)
    replies = load_champion(uri, "llmpipe-t").predict(["What is 2 + 3?"], params={"max_new_tokens": 4})
    assert len(replies) == 1 and isinstance(replies[0], str)

    client = MlflowClient(uri)
    parent = client.get_run(summary["mlflow_run_id"])
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "report")} >= {"report/report.md", "report/report.json"}
    card = json.loads(RunDir(run_dir).report_json.read_text())
    first = json.loads(RunDir(eval_run[0]).report_json.read_text())
    assert {**card, "registry": None} == {**first, "registry": None}
    for plot in (RunDir(eval_run[0]).eval_dir / "plots").iterdir():
        assert (RunDir(run_dir).eval_dir / "plots" / plot.name).read_bytes() == plot.read_bytes()
    assert parent.data.metrics["sft.val_bpb"] == pytest.approx(card["checkpoints"]["sft"]["val_bpb"])
    assert parent.data.tags["llmpipe.champion"] == "llmpipe-t v1"
    with get_client(sync_client=True) as prefect:
        artifacts = [a for a in prefect.read_artifacts() if a.key == "t-report"]
    assert artifacts and "| model | val loss | val bpb |" in artifacts[0].data

    again = pipeline(config_path=str(config_path), run_dir=str(run_dir), only="eval")
    assert again["stages"] == {"eval": "cached"}
    assert [v.version for v in client.search_model_versions("name='llmpipe-t'")] == [1]
    # the second run links to the first and compares every report metric with it and with the champion (its model)
    second = client.get_run(again["mlflow_run_id"])
    assert second.data.tags["llmpipe.previous_run_id"] == summary["mlflow_run_id"]
    changes = client.download_artifacts(second.info.run_id, "report/changes.md", str(tmp_path))
    rows = {line.split(" | ")[0].strip("| "): line for line in open(changes).read().splitlines() if line.startswith("| ")}
    assert set(rows) - {"metric"} == set(parent.data.metrics)
    value = f"{card['checkpoints']['sft']['val_bpb']:.4g}"
    assert rows["sft.val_bpb"] == f"| sft.val_bpb | {value} | {value} | +0 | {value} | +0 |"


def test_llmpipe_eval_reruns_the_stage_alone_with_a_task_folder_of_ones_own(eval_run, tmp_path, capsys):
    """`llmpipe eval --config C --run-dir D --set 'eval.task_dirs=["DIR"]'` on a finished run."""
    from llmpipe.cli import main
    from llmpipe.config import dump
    from llmpipe.eval.tasks import write_task

    run_dir = _copy_run(eval_run[0], tmp_path / "runs" / "t", without=("eval",))
    config_path = tmp_path / "t.yaml"
    config_path.write_text(dump(config_for(run_dir)))
    docs = [{"question": f"What is {a} + 1?", "choices": [str(a + 1), str(a + 2)], "label": 0} for a in range(6)]
    write_task(tmp_path / "mine" / "plus_one", "plus_one", docs[:4], docs[4:], doc_to_text="{{question}}", num_fewshot=1)
    args = ["eval", "--config", str(config_path), "--run-dir", str(run_dir)]
    assert main([*args, "--set", "eval.task_dirs=[/no/such/folder]"]) == 2
    assert "eval.task_dirs=[\"/no/such/folder\"]: not a folder: /no/such/folder" in capsys.readouterr().err
    assert main([*args, "--set", f"eval.task_dirs=[{tmp_path / 'mine'}]"]) == 0
    card = json.loads(RunDir(run_dir).report_json.read_text())
    assert set(card["checkpoints"]["sft"]["tasks"]) == {"instruct_choice", "plus_one"}
    assert card["checkpoints"]["sft"]["tasks"]["plus_one"]["n"] == 4 and card["baselines"]["chance"]["plus_one"] == 0.5
    assert card["registry"]["registered"] and card["registry"]["model_name"] == "llmpipe-t"
