"""Run configuration: one pydantic model per stage, loaded from YAML with `--set` overrides.

The sections live beside this file, one module per area (`data`, `training`, `post_training`);
this module assembles them into `RunConfig` and is the only one that reads YAML. Every model
forbids unknown keys, so a typo fails before any work, with one line naming the field, the value
and what is allowed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from llmpipe.config.base import ConfigError, Section
from llmpipe.config.data import (
    C4QualityConfig,
    CrawlSection,
    FineWebQualityConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    LanguageFilterConfig,
    MinhashConfig,
    PrepareSection,
    RayOptions,
    ShardSection,
    SlurmOptions,
    TokenizerSection,
)
from llmpipe.config.evaluation import BUILTIN_TASKS, CHAMPION_METRICS, EvalSection
from llmpipe.config.post_training import (
    ALIGN_METHODS,
    AlignSection,
    DPOReferenceSection,
    DPOSection,
    InstructSection,
    PPOSection,
    RewardSection,
    SFTSection,
)
from llmpipe.config.training import (
    SHARDED_STRATEGIES,
    ModelSection,
    ParallelConfig,
    PretrainSection,
    TrainSection,
    layout_error,
)
from llmpipe.redact import redact

__all__ = [
    "ALIGN_METHODS", "BUILTIN_TASKS", "CHAMPION_METRICS", "SHARDED_STRATEGIES", "AlignSection", "C4QualityConfig", "ConfigError", "CrawlSection",
    "DPOReferenceSection", "DPOSection", "EvalSection", "FineWebQualityConfig", "GopherQualityConfig", "GopherRepetitionConfig",
    "InstructSection", "LanguageFilterConfig", "MinhashConfig", "ModelSection", "ParallelConfig", "PPOSection", "PrepareSection",
    "PretrainSection", "RayOptions", "RewardSection", "RunConfig", "RunSection", "SFTSection", "Section", "ShardSection",
    "SlurmOptions", "TokenizerSection", "TrainSection", "dump", "load", "parse_override", "read_yaml", "to_yaml", "validate",
]


class RunSection(Section):
    name: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # runs/<name>/
    seed: int = Field(1337, ge=0)  # every random choice in every stage derives from it
    run_dir: Path | None = None  # default: runs/<name>
    max_parallel_stages: int = Field(2, ge=1)  # stages of independent branches run at once (threads); 2 suits 2 cores


class RunConfig(Section):
    run: RunSection = RunSection()
    crawl: CrawlSection = CrawlSection()
    prepare: PrepareSection = PrepareSection()
    tokenizer: TokenizerSection = TokenizerSection()
    shard: ShardSection = ShardSection()
    model: ModelSection = ModelSection()
    pretrain: PretrainSection = PretrainSection()
    align: AlignSection = AlignSection()
    instruct: InstructSection = InstructSection()
    sft: SFTSection = SFTSection()
    dpo_reference: DPOReferenceSection = DPOReferenceSection()
    dpo: DPOSection = DPOSection()
    reward: RewardSection = RewardSection()
    ppo: PPOSection = PPOSection()
    eval: EvalSection = EvalSection()

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        if self.model.vocab_size < self.tokenizer.vocab_size:
            raise ValueError(f"model.vocab_size={self.model.vocab_size} must be >= tokenizer.vocab_size={self.tokenizer.vocab_size}")
        strategy = self.pretrain.parallel.strategy
        if self.model.tie_embeddings and self.pretrain.world_size > 1 and strategy in ("tp", "fsdp_tp", "pp"):
            # the input table and the output head are sharded (tp) or placed (pp) differently
            raise ValueError(f"model.tie_embeddings=true does not work with pretrain.parallel.strategy={strategy}; "
                             "set model.tie_embeddings: false (allowed strategies with tied embeddings: ddp, zero1, zero2, fsdp)")
        for name in type(self).model_fields:  # impossible degrees fail here, before any process starts
            section = getattr(self, name)
            if isinstance(section, TrainSection) and (error := layout_error(name, section, self.model)):
                raise ValueError(error)
        return self

    @property
    def run_dir(self) -> Path:
        return self.run.run_dir if self.run.run_dir is not None else Path("runs") / self.run.name

    def section(self, name: str) -> Section:
        return getattr(self, name)


# --- loading ---------------------------------------------------------------------------------


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {key} is not a section")
        node = child
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`stage.key=value` -> (`stage.key`, value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or "." not in key:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. shard.seq_len=512")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({err.__class__.__name__})") from None
    return key.strip(), value


def _describe(error: dict, model: type[BaseModel]) -> str:
    """One pydantic error -> `field=value: what is allowed`."""
    loc = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, error["loc"][:-1])
        return f"{loc}: unknown key; allowed keys: {', '.join(allowed)}"
    message = redact(error["msg"].removeprefix("Value error, "))
    if not loc:  # a check across sections
        return message
    value = error.get("input")
    shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
    return f"{loc}={redact(shown)}: {message}"


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    return sorted(model.model_fields)


def validate(tree: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        first = err.errors()[0]
        more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
        raise ConfigError(f"config error: {_describe(first, RunConfig)}{more}") from None


def load(path: str | Path, overrides: list[str] = (), run_dir: str | Path | None = None) -> RunConfig:
    """Read a YAML config, apply `section.key=value` overrides, validate everything."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config error: {path}: no such file")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config error: {path}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config error: {path}: top level must be a mapping of sections")
    for text in overrides:
        _set_dotted(tree, *parse_override(text))
    if run_dir is not None:
        _set_dotted(tree, "run.run_dir", str(run_dir))
    return validate(tree)


def read_yaml(path: str | Path) -> Any:
    """Any YAML file of ours to read (an lm-eval task file, say), as parsed; invalid YAML fails naming the file."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None


def to_yaml(tree: Any) -> str:
    return yaml.safe_dump(tree, sort_keys=False, allow_unicode=True)


def dump(config: RunConfig) -> str:
    """The resolved config as YAML, saved at the root of the run directory. Without `run.run_dir`:
    that is where the file lies, and a run directory moved elsewhere keeps the same bytes."""
    data = config.model_dump(mode="json")
    data["run"].pop("run_dir", None)
    return yaml.safe_dump(data, sort_keys=False)
