"""Stage `prepare`: WARC -> text -> quality filters -> exact dedup -> MinHash dedup -> documents.

Every step is a datatrove pipeline step, run by a datatrove executor (local by default; Slurm or
Ray from the config). The work is split into datatrove jobs, each with its own logging folder,
where the executor writes one completion marker per rank, so a rerun skips finished ranks:

  1. extract   (tasks)      WarcReader -> Trafilatura [-> WET reader] -> filters -> JSONL   .work/filtered
                            (pages extracted by an earlier run come from the extraction cache: extract.py)
  2. exact     (tasks, 1, tasks)   ExactDedupSignature, ExactFindDedups, ExactDedupFilter   .work/exact_deduped
  3. minhash   (tasks, buckets, 1) MinhashDedupSignature, MinhashDedupBuckets, MinhashDedupCluster
  4. write     (tasks)      MinhashDedupFilter -> JsonlWriter / ParquetWriter              prepare/documents

Bookkeeping lives under prepare/.datatrove/<hash>/ where <hash> covers the config and the input:
datatrove's completion markers do not look at the pipeline's settings, so a changed threshold must
get a fresh folder. Drop counts per filter and per dedup step come from datatrove's per-rank stats.

Clusters: `prepare.executor: slurm` runs the same jobs as a chain of sbatch arrays
(datatrove's SlurmPipelineExecutor, `prepare.slurm.*`; the run directory must be on a shared
filesystem) and waits for the last one; `prepare.executor: ray` runs them on the Ray cluster
that `ray.init(prepare.ray.address)` joins (`pip install ray`).
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import hashlib
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import fsspec.compression
from datatrove.pipeline.dedup import MinhashDedupFilter
from datatrove.pipeline.dedup.exact_dedup import (
    ExactDedupConfig,
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
)
from datatrove.pipeline.dedup.minhash import MinhashConfig as DatatroveMinhashConfig
from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets
from datatrove.pipeline.readers import JsonlReader, WarcReader
from datatrove.pipeline.writers import JsonlWriter, ParquetWriter
from datatrove.utils.hashing import HashConfig

from llmpipe.config import PrepareSection
from llmpipe.data import filters as F
from llmpipe.data.dedup import (
    OldestFirstMinhashCluster,
    OldestFirstMinhashSignature,
    first_crawled_first,
    normalized_text,
)
from llmpipe.data.extract import CachedTrafilatura, ExtractionCache
from llmpipe.errors import MissingInput
from llmpipe.faults import fault_point

HTML_TYPES = ("text/html", "application/xhtml+xml")
_CHARSET = re.compile(r"charset\s*=\s*[\"']?([\w.:-]+)", re.IGNORECASE)
_BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def page_from_record(record, max_bytes: int) -> dict | str | None:
    """A WARC record as datatrove's reader dict, or why the page is skipped: `not_html`, `empty`,
    `too_large`, `binary` (NUL bytes), `undecodable`; None for records that are not pages
    (warcinfo, request). The text is decoded by its byte-order mark, else the charset the HTTP
    header declares, else UTF-8, else the charset cchardet detects (datatrove's fallback)."""
    import magic

    if record.rec_type not in ("response", "conversion"):  # WET files hold "conversion" records
        return None
    content_type = (record.http_headers.get_header("Content-Type") or "") if record.http_headers else ""
    mime = record.rec_headers.get_header("WARC-Identified-Payload-Type") or content_type.split(";")[0].strip().lower() or None
    allowed = (*HTML_TYPES, *(("text/plain",) if record.rec_type == "conversion" else ()))
    if mime is not None and mime not in allowed:
        return "not_html"
    body = record.content_stream().read(max_bytes + 1)
    if len(body) > max_bytes:
        return "too_large"
    if not body.strip():
        return "empty"
    bom = next((codec for mark, codec in _BOMS if body.startswith(mark)), None)
    if bom is None and b"\x00" in body:
        return "binary"  # no text encoding of HTML has NUL bytes but UTF-16/32, which start with a mark
    if mime is None and magic.from_buffer(body, mime=True) not in allowed:
        return "not_html"  # older crawls without a type
    declared = match.group(1) if (match := _CHARSET.search(content_type)) else None
    text = _decode(body, [bom, declared])
    if text is None:
        return "undecodable"
    headers = record.rec_headers
    return {"text": text, "id": headers.get_header("WARC-Record-ID"), "url": headers.get_header("WARC-Target-URI"),
            "date": headers.get_header("WARC-Date")}


def _decode(body: bytes, first: list[str | None]) -> str | None:
    """`body` decoded by the first of `first`, UTF-8 and cchardet's guess that fits."""
    import cchardet

    for codec in filter(None, dict.fromkeys([*first, "utf-8", cchardet.detect(body)["encoding"]])):
        try:
            return body.decode(codec)
        except (UnicodeDecodeError, LookupError):
            continue
    return None


class RecordShardedWarcReader(WarcReader):
    """WarcReader that, with fewer files than tasks, splits the records (not the files) across ranks,
    records the file's name inside the input folder as `file_path`, and counts each page it
    skips by reason (`skipped_<reason>` in its stats; datatrove's reader drops them silently).

    A crawl session writes one WARC file; without this, one task would do all the extraction.
    datatrove would record the absolute path, and a run directory moved elsewhere would then
    make other bytes from the same pages.
    """

    def __init__(self, *args, max_page_bytes: int = 5_000_000, records: frozenset[str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_file_path = False  # set below, relative
        self.max_page_bytes = max_page_bytes
        self.records = records  # the response records the crawl has now (its pages.jsonl); None: every one
        self._count_skips = True  # every rank reads every record when records are split: rank 0 counts

    def read_file(self, filepath: str):
        from warcio.archiveiterator import ArchiveIterator

        with self.data_folder.open(filepath, "rb", compression=self.compression) as f:
            for index, record in enumerate(ArchiveIterator(f)):
                if (self.records is not None and record.rec_type == "response"
                        and record.rec_headers.get_header("WARC-Record-ID") not in self.records):
                    continue  # a page's older version, or one a refresh did not find again
                with self.track_time():
                    page = page_from_record(record, self.max_page_bytes)
                    if isinstance(page, str) and self._count_skips:
                        self.stat_update(f"skipped_{page}")
                    document = self.get_document_from_dict(page, filepath, index) if isinstance(page, dict) else None
                if document:
                    yield document

    def get_document_from_dict(self, data: dict, source_file: str, id_in_file: int):
        document = super().get_document_from_dict(data, source_file, id_in_file)
        if document:
            document.metadata.setdefault("file_path", source_file)
        return document

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        files = self.data_folder.get_shard(0, 1, recursive=self.recursive, glob_pattern=self.glob_pattern)
        if len(files) >= world_size:
            yield from super().run(data, rank, world_size)
            return
        self._count_skips = rank == 0
        if data:
            yield from data
        for i, doc in enumerate(self.read_files_shard(files)):
            if i % world_size == rank:
                self.update_doc_stats(doc)
                yield doc


def _gzip_without_mtime(fileobj, mode: str = "rb", **kwargs):
    return gzip.GzipFile(fileobj=fileobj, mode=mode, mtime=0, **kwargs)


# gzip stamps the time of writing into each file's header: the same documents would hash differently
# on every run. Registered on import, which unpickling `JsonlGzWriter` on a Slurm or Ray worker does.
fsspec.compression.register_compression("gzip-mtime0", _gzip_without_mtime, [], force=True)


class JsonlGzWriter(JsonlWriter):
    """datatrove's JsonlWriter to `<rank>.jsonl.gz`, with no timestamp in the gzip header."""

    def __init__(self, output_folder: str):
        super().__init__(output_folder, output_filename="${rank}.jsonl.gz", compression="gzip-mtime0")


def _has_files(folder: Path, pattern: str) -> bool:
    return folder.is_dir() and any(folder.glob(pattern))


def work_hash(cfg: PrepareSection, inputs: list[Path]) -> str:
    """Config + input file names (inside their folder, so a moved run keeps its bookkeeping) and
    sizes: the key of the datatrove bookkeeping folder."""
    listing = sorted((i, str(p.relative_to(folder)), p.stat().st_size) for i, folder in enumerate(inputs)
                     if folder.exists() for p in ([folder] if folder.is_file() else folder.rglob("*")) if p.is_file())
    blob = json.dumps({"config": cfg.digest(), "inputs": listing}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --- executors ---------------------------------------------------------------------------------


def _warm_up() -> None:
    """Load spaCy's blank English tokenizer once here: forked workers inherit it (saves seconds per job)."""
    from datatrove.utils.word_tokenizers import load_word_tokenizer

    load_word_tokenizer("en").word_tokenize("Warm up the tokenizer.")


_forking = threading.local()  # .default_sigterm: forks from this thread reset SIGTERM in the child


def _reset_sigterm_in_child() -> None:
    if getattr(_forking, "default_sigterm", False):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


os.register_at_fork(after_in_child=_reset_sigterm_in_child)


@contextlib.contextmanager
def _default_sigterm():
    """Forked workers must die on SIGTERM: the pool stops them with it at shutdown. A host that
    turns SIGTERM into an exception (Prefect's engine does) would otherwise hang the pool. The
    reset happens in each child right after the fork, so it works from any thread (Prefect runs
    stages in worker threads, where `signal.signal` is not allowed) and leaves the parent alone."""
    _forking.default_sigterm = True
    try:
        yield
    finally:
        _forking.default_sigterm = False


class Runner:
    """Builds and runs datatrove executors of the configured kind; remembers wall time per job."""

    def __init__(self, cfg: PrepareSection, logs: Path):
        self.cfg = cfg
        self.logs = logs
        self.seconds: dict[str, float] = {}
        self._last = None  # slurm: the previous job, for depends=
        if cfg.executor == "local":
            _warm_up()

    def run(self, name: str, pipeline: list, tasks: int, workers: int | None = None) -> None:
        workers = min(workers or self.cfg.workers, tasks)
        logging_dir = str(self.logs / name)
        t0 = time.perf_counter()
        if self.cfg.executor == "local":
            from datatrove.executor import LocalPipelineExecutor

            # fork: workers inherit the parent's imports; forkserver would re-import __main__
            with _default_sigterm():
                LocalPipelineExecutor(pipeline, tasks=tasks, workers=workers, logging_dir=logging_dir,
                                      start_method="fork").run()
        elif self.cfg.executor == "ray":
            import ray
            from datatrove.executor.ray import RayPipelineExecutor

            if not ray.is_initialized():
                ray.init(address=self.cfg.ray.address, ignore_reinit_error=True)
            RayPipelineExecutor(pipeline, tasks=tasks, workers=workers, logging_dir=logging_dir,
                                cpus_per_task=self.cfg.ray.cpus_per_task,
                                mem_per_cpu_gb=self.cfg.ray.mem_per_cpu_gb).run()
        else:
            self._submit_slurm(name, pipeline, tasks, workers, logging_dir)
            return
        self.seconds[name] = time.perf_counter() - t0
        fault_point("prepare", f"after_{name}")  # LLMPIPE_FAULT=prepare:after_exact_filter: killed between jobs

    def _submit_slurm(self, name, pipeline, tasks, workers, logging_dir) -> None:
        import sys

        from datatrove.executor import SlurmPipelineExecutor

        s = self.cfg.slurm
        venv = s.venv_path or (sys.prefix if sys.prefix != sys.base_prefix else None)
        self._last = SlurmPipelineExecutor(
            pipeline, tasks=tasks, workers=workers, time=s.time, partition=s.partition,
            cpus_per_task=s.cpus_per_task, mem_per_cpu_gb=s.mem_per_cpu_gb, venv_path=venv,
            sbatch_args=dict(s.sbatch_args) or None, job_name=f"llmpipe-prepare-{name}",
            logging_dir=logging_dir, depends=self._last)

    def finish(self, poll_s: float = 30.0) -> None:
        """Slurm: submit the chain (the last job launches its dependencies) and wait for it."""
        if self._last is None:
            return
        t0 = time.perf_counter()
        self._last.run()
        while self._last.get_incomplete_ranks():
            time.sleep(poll_s)
        self.seconds["slurm_total"] = time.perf_counter() - t0


# --- the pipeline ------------------------------------------------------------------------------


def run_prepare(cfg: PrepareSection, warc_dir: Path, wet_dir: Path | None, documents_dir: Path,
                work_dir: Path, records: frozenset[str] | None = None, extraction_cache: Path | None = None) -> dict:
    """Run the whole prepare pipeline on the WARCs' response records (those in `records`); return counts for the
    manifest. Pages whose HTML is in `extraction_cache` are not extracted again; what is, is added to it."""
    logs, data = work_dir / "logs", work_dir / "data"
    cache = ExtractionCache(extraction_cache or work_dir / "extractions.sqlite")
    runner = Runner(cfg, logs)
    filter_steps = F.build_filters(cfg)

    # 1. read, extract, filter
    pipeline: list = []
    if _has_files(warc_dir, "*.warc*"):
        pipeline += [RecordShardedWarcReader(str(warc_dir), glob_pattern="*.warc*", default_metadata={"source": "warc"},
                                             max_page_bytes=cfg.max_page_bytes, records=records),
                     # deduplicate=False: trafilatura's own dedup drops paragraphs it saw in earlier pages of the
                     # same worker, so a page's text would depend on crawl order (the dedup steps do that job)
                     CachedTrafilatura(cache.path, data / "extracted_new", favour_precision=cfg.favour_precision,
                                       timeout=cfg.extract_timeout_s, deduplicate=False)]
    if wet_dir is not None and _has_files(wet_dir, "*.wet*"):
        pipeline.append(RecordShardedWarcReader(str(wet_dir), glob_pattern="*.wet*",
                                                default_metadata={"source": "wet"}, max_page_bytes=cfg.max_page_bytes))
    if not pipeline:
        raise MissingInput(f"prepare: no WARC files in {warc_dir} and no WET files in {wet_dir}")
    pipeline += [step for _, step in filter_steps]
    pipeline.append(JsonlGzWriter(str(data / "filtered")))
    runner.run("extract_filter", pipeline, cfg.tasks)

    deduplicate(cfg, runner, data / "filtered", documents_dir, data)
    runner.finish()
    cache.merge(data / "extracted_new")
    return collect_counts(logs, [name for name, _ in filter_steps], documents_dir, runner.seconds)


def deduplicate(cfg: PrepareSection, runner: Runner, input_dir: Path, documents_dir: Path, data: Path) -> None:
    """Exact dedup, then MinHash (signatures, LSH buckets, clusters, filter), then write the documents; of
    duplicates, the one from the earliest crawl part is kept (`llmpipe.data.dedup`)."""
    tasks, current = cfg.tasks, input_dir
    if cfg.exact_dedup:
        exact = ExactDedupConfig(content_getter=normalized_text, document_priority=first_crawled_first,
                                 hash_config=HashConfig(precision=64))
        runner.run("exact_signature", [JsonlReader(str(current)),
                                       ExactDedupSignature(str(data / "exact" / "sigs"), exact, finder_workers=1)], tasks)
        runner.run("exact_find", [ExactFindDedups(str(data / "exact" / "sigs"), str(data / "exact" / "dups"),
                                                  exact)], 1)
        runner.run("exact_filter", [JsonlReader(str(current)), ExactDedupFilter(str(data / "exact" / "dups"), exact),
                                    JsonlGzWriter(str(data / "exact_deduped"))],
                   tasks)
        current = data / "exact_deduped"

    final: list = [JsonlReader(str(current))]
    if cfg.minhash.enabled:
        m = cfg.minhash
        mh = DatatroveMinhashConfig(n_grams=m.n_grams, num_buckets=m.num_buckets,
                                    hashes_per_bucket=m.hashes_per_bucket, seed=m.seed,
                                    hash_config=HashConfig(precision=64))
        runner.run("minhash_signature", [JsonlReader(str(current)),
                                         OldestFirstMinhashSignature(str(data / "minhash" / "sigs"), config=mh)], tasks)
        runner.run("minhash_buckets", [MinhashDedupBuckets(str(data / "minhash" / "sigs"),
                                                           str(data / "minhash" / "buckets"), config=mh)],
                   m.num_buckets)
        runner.run("minhash_cluster", [OldestFirstMinhashCluster(str(data / "minhash" / "buckets"),
                                                                 str(data / "minhash" / "remove"),
                                                                 str(data / "minhash" / "sigs" / "parts"), config=mh)], 1)
        final.append(MinhashDedupFilter(str(data / "minhash" / "remove")))
    if cfg.output_format == "parquet":
        final.append(ParquetWriter(str(documents_dir), output_filename="${rank}.parquet"))
    else:
        final.append(JsonlGzWriter(str(documents_dir)))
    runner.run("write", final, tasks)


# --- counts ------------------------------------------------------------------------------------


def _step(stats: list, name: str):
    return next((s for s in stats if s.name.endswith(name)), None)


def collect_counts(logs: Path, filter_names: list[str], documents_dir: Path, seconds: dict) -> dict:
    """The funnel (documents kept after each step), drop reasons per filter, output size, timings."""
    extract_stats = F.read_stats(logs / "extract_filter")
    counts: dict = {}
    funnel: dict = {}
    reused = 0
    skipped: dict[str, int] = {}
    for step in extract_stats:  # the readers' pages skipped before extraction, by reason
        for key, metric in step.stats.items():
            if key.startswith("skipped_"):
                reason = key.removeprefix("skipped_")
                skipped[reason] = skipped.get(reason, 0) + int(F.metric_value(metric))
    if skipped:
        counts["pages_skipped"] = dict(sorted(skipped.items()))
    extractor = _step(extract_stats, CachedTrafilatura.name)
    if extractor is not None:
        ex = F.step_counts(extractor)
        values = {k: int(F.metric_value(v)) for k, v in extractor.stats.items()}
        reasons = {"empty": values.get("dropped", 0), **{k: values[k] for k in ("timeout", "broken_process",
                                                                              "clean_error") if k in values}}
        counts["pages_in"] = ex["in"]
        counts["extract"] = {"in": ex["in"], "kept": ex["kept"], "dropped": ex["in"] - ex["kept"],
                             "reasons": {k: n for k, n in reasons.items() if n}}
        funnel["extracted"] = ex["kept"]
        reused = values.get("reused", 0)
    filters = F.filter_counts(extract_stats, filter_names)
    for name, c in filters.items():
        funnel[name] = c["kept"]
    counts["filters"] = filters
    for job, step_name, key in (("exact_filter", ExactDedupFilter.name, "exact_dedup"),
                                ("write", MinhashDedupFilter.name, "minhash_dedup")):
        step = _step(F.read_stats(logs / job), step_name) if (logs / job).is_dir() else None
        if step is not None:
            c = F.step_counts(step)
            c["dropped"] = c["in"] - c["kept"]
            counts[key] = {k: v for k, v in c.items() if k != "reasons"}
            funnel[key] = c["kept"]
    docs, text_bytes, files = count_documents(documents_dir)
    funnel["written"] = docs
    counts.update({"kept_after": funnel, "documents": docs, "text_bytes": text_bytes, "output_files": files,
                   # this run's, MLflow only: the wall times, and the pages whose text an earlier run extracted
                   "timing": {"timing_s": {k: round(v, 3) for k, v in seconds.items()}, "pages_reused": reused}})
    return counts


def count_documents(folder: Path) -> tuple[int, int, int]:
    """(documents, UTF-8 bytes of text, files) of a folder of .jsonl.gz or .parquet documents."""
    docs = text_bytes = files = 0
    for path in sorted(Path(folder).glob("*")):
        if path.name.endswith(".jsonl.gz"):
            files += 1
            with gzip.open(path, "rt", encoding="utf-8") as f:
                for line in f:
                    docs += 1
                    text_bytes += len(json.loads(line)["text"].encode())
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            files += 1
            column = pq.read_table(path, columns=["text"]).column("text")
            docs += len(column)
            text_bytes += sum(len(t.encode()) for t in column.to_pylist())
    return docs, text_bytes, files


# --- the stage ---------------------------------------------------------------------------------


def prepare_stage(ctx, cfg: PrepareSection) -> dict:
    from llmpipe.data.crawl import read_view

    warc_dir, wet_dir, pages = ctx.inputs["warc"], ctx.inputs["wet"], ctx.inputs["pages"]
    work_dir = Path(ctx.out_dir) / ".datatrove" / work_hash(cfg, [warc_dir, wet_dir, pages])
    documents_dir = ctx.run_dir.documents_dir
    records = frozenset(entry["record"] for entry in read_view(pages)) if Path(pages).is_file() else None
    counts = run_prepare(cfg, warc_dir, wet_dir, documents_dir, work_dir, records, ctx.run_dir.extraction_cache)
    counts["executor"] = cfg.executor
    counts["output_format"] = cfg.output_format
    return counts


if __name__ == "__main__":
    from llmpipe.runner import stage_main

    stage_main("prepare")
