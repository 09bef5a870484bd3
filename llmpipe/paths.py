"""The run directory: the one place that knows where every stage reads and writes.

    runs/<name>/
      config.yaml                 resolved config of the last run
      crawl/warc/*.warc.gz        crawl: WARC request/response records (revisit records for a refresh's unchanged pages)
      crawl/pages.jsonl           crawl: the pages it has now (URL, payload digest, record): its fingerprint
      prepare/documents/*.jsonl.gz  prepare: extracted, filtered, deduplicated documents
      tokenizer/tokenizer.json    tokenizer: BPE + tokenizer_config.json (chat template)
      shard/{train,val}_NNNNN.arrow  shard: token ids, Arrow IPC stream
      pretrain/checkpoints/step_NNNNNNN/  pretrain: model, optimizer, loader and RNG state
      instruct/{sft,preferences,prompts}/{train,heldout}.jsonl  instruct: the default post-training data
      sft/, dpo/                  like pretrain/: checkpoints/, then model.safetensors + model_config.json
      dpo_reference/{reference,heldout}_logps.arrow  the SFT model's log-probs of each preference pair
      eval/report.{json,md}, eval/plots/*.png, eval/tasks/<task>/  eval: the report card, lm-eval task folders
      <stage>/manifest.json       written last: the stage's completion marker
      <stage>/.timing.json        the wall time of its last run (hidden: not an output)
      .lock                       locked by the run that is writing here (llmpipe/locks.py)
      .continue/pretrain/         a refresh's previous pretraining (manifest, final checkpoint), continued from
      .cache/extractions.sqlite   the text prepare extracted from each page's HTML so far: a refresh reuses it
      logs/<stage>.log            everything a stage printed or logged (the console shows a summary)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def stage(self, name: str) -> Path:
        return self.root / name

    def manifest(self, stage: str) -> Path:
        return self.stage(stage) / MANIFEST

    @property
    def config_file(self) -> Path:
        return self.root / "config.yaml"

    @property
    def lock_file(self) -> Path:
        """Held (flock) by the one process running on this directory; hidden: not an output."""
        return self.root / ".lock"

    @property
    def warc_dir(self) -> Path:
        return self.stage("crawl") / "warc"

    @property
    def crawl_pages(self) -> Path:
        return self.stage("crawl") / "pages.jsonl"

    @property
    def wet_dir(self) -> Path:
        return self.stage("crawl") / "wet"

    @property
    def documents_dir(self) -> Path:
        return self.stage("prepare") / "documents"

    @property
    def extraction_cache(self) -> Path:
        """Outside prepare/, which a rerun with other inputs empties; the documents are the same bytes with it or without."""
        return self.root / ".cache" / "extractions.sqlite"

    @property
    def tokenizer_dir(self) -> Path:
        return self.stage("tokenizer")

    @property
    def shards_dir(self) -> Path:
        return self.stage("shard")

    def instruct_file(self, kind: str, split: str) -> Path:
        """instruct/<kind>/<split>.jsonl: kind sft, preferences or prompts; split train or heldout."""
        return self.stage("instruct") / kind / f"{split}.jsonl"

    sft_train_file = property(lambda self: self.instruct_file("sft", "train"))
    sft_heldout_file = property(lambda self: self.instruct_file("sft", "heldout"))
    preferences_train_file = property(lambda self: self.instruct_file("preferences", "train"))
    preferences_heldout_file = property(lambda self: self.instruct_file("preferences", "heldout"))
    prompts_train_file = property(lambda self: self.instruct_file("prompts", "train"))
    prompts_heldout_file = property(lambda self: self.instruct_file("prompts", "heldout"))

    def checkpoints_dir(self, phase: str) -> Path:
        return self.stage(phase) / "checkpoints"

    def continue_dir(self, stage: str) -> Path:
        """.continue/<stage>/: a refreshed run's previous result (manifest, final checkpoint), which it continues."""
        return self.root / ".continue" / stage

    def timing_file(self, stage: str) -> Path:
        """<stage>/.timing.json: the wall time of the stage's last run; hidden, so not one of its outputs."""
        return self.stage(stage) / ".timing.json"

    @property
    def eval_dir(self) -> Path:
        return self.stage("eval")

    @property
    def report_json(self) -> Path:
        return self.eval_dir / "report.json"

    @property
    def report_md(self) -> Path:
        return self.eval_dir / "report.md"

    def stage_log(self, stage: str) -> Path:
        """Outside the stage folder: a log holds wall-clock times, and a rerun appends to it."""
        return self.root / "logs" / f"{stage}.log"

    def prefect_results(self, stage: str) -> Path:
        """Prefect's persisted task results live inside the stage folder: delete the folder, lose the cache."""
        return self.stage(stage) / ".prefect"
