"""Quality filters (exact drop reasons on literal texts), dedup recall, and the prepare stage on a WARC."""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmpipe.config import PrepareSection
from llmpipe.data import filters as F
from llmpipe.data.prepare import Runner, count_documents, deduplicate, prepare_stage, work_hash
from llmpipe.paths import RunDir

PROSE = [
    "The river rises in the northern hills and winds slowly toward the sea. Farmers along its banks have "
    "grown rice and barley there for centuries. In spring the water turns brown with melted snow. By late "
    "summer it is clear enough to see the stones on the bottom. Fishermen say the best time to catch trout "
    "is just after a storm. The old bridge near the village was rebuilt after the flood of 1952.",
    "A good loaf of bread needs only flour, water, salt and time. The dough should rest until it has doubled "
    "in size. Bakers often fold it several times to build strength in the gluten. A hot oven gives the crust "
    "its colour and its crackle. Many people prefer to let the loaf cool before they cut it. Fresh bread "
    "rarely lasts more than a day in a busy kitchen.",
    "The library opened its doors to the public in the autumn of 1887. Its founders hoped that every child "
    "in the town would learn to read. At first the shelves held fewer than two thousand books. Today the "
    "collection includes maps, letters and recordings as well. Volunteers still run a reading circle on "
    "Saturday mornings. The building itself was restored with help from a local charity.",
    "Migrating birds use the sun, the stars and the magnetic field of the earth to find their way. Some "
    "species fly thousands of kilometres without stopping to rest. Young birds often make the journey alone "
    "on their first attempt. Scientists track them with light sensors that weigh less than a gram. The "
    "data show that many routes have shifted over the past fifty years. Warmer winters are one likely cause.",
]
FRENCH = ("Le village se trouve au pied de la montagne, près d'une petite rivière. Les habitants cultivent "
          "des pommes et des poires depuis très longtemps. Chaque automne, une grande fête réunit toutes les "
          "familles de la vallée. On y mange du pain frais, du fromage et des tartes aux fruits. Les enfants "
          "jouent sur la place jusqu'à la tombée de la nuit. Le marché du samedi attire aussi des visiteurs.")


def _filter(name: str, cfg: PrepareSection | None = None):
    return dict(F.build_filters(cfg or PrepareSection()))[name]


# --- filters: exact drop reasons on literal texts ------------------------------------------------


@pytest.mark.parametrize("name, text, reason", [
    ("gopher_quality", "Far too short to be a document.", "gopher_short_doc"),
    ("gopher_quality", " ".join(["a b c d"] * 20), "gopher_below_avg_threshold"),
    ("gopher_quality", " ".join(["#tag #news word"] * 20), "gopher_too_many_hashes"),
    ("gopher_quality", "\n".join(["- first item of the list", "- another item in the list"] * 15),
     "gopher_too_many_bullets"),
    ("gopher_quality", " ".join(["1234 5678 90.5 3.14 apple"] * 20), "gopher_below_alpha_threshold"),
    ("gopher_quality", " ".join(["river mountain forest valley meadow"] * 20), "gopher_enough_stop_words"),
    ("gopher_repetition", "\n\n".join(["Buy cheap watches online today."] * 10 + [PROSE[0]]), "dup_para_frac"),
    ("gopher_repetition", "\n".join(["Click here to subscribe."] * 8 + PROSE[0].split(". ")), "dup_line_frac"),
    ("c4_quality", PROSE[0] + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.", "lorem_ipsum"),
    ("c4_quality", PROSE[1] + "\nThe config looks like this: {\"a\": 1}.", "curly_bracket"),
    ("c4_quality", "One sentence only here.\nAnd a second one.", "too_few_sentences"),
    ("fineweb_quality", "\n".join(["a line without a full stop at its end number %d" % i for i in range(20)]),
     "line_punct_ratio"),
    ("fineweb_quality", "\n".join(["Short line."] * 3 + [f"Item {i}." for i in range(20)] + [PROSE[2]]),
     "short_line_ratio"),
    ("fineweb_quality", "\n".join([PROSE[3], PROSE[3], PROSE[2]]), "char_dup_ratio"),
    ("language", FRENCH, "language"),
])
def test_filter_drop_reason(name, text, reason):
    assert F.drop_reason(_filter(name), text) == reason


@pytest.mark.parametrize("name", ["language", "gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality"])
@pytest.mark.parametrize("text", PROSE[:2])
def test_filters_keep_prose(name, text):
    assert F.drop_reason(_filter(name), text) is None


def test_thresholds_come_from_the_config():
    short = " ".join(PROSE[0].split()[:40])  # 40 words: too short for 50, enough for 30
    assert F.drop_reason(_filter("gopher_quality"), short) == "gopher_short_doc"
    relaxed = PrepareSection.model_validate({"gopher_quality": {"min_doc_words": 30}})
    assert F.drop_reason(_filter("gopher_quality", relaxed), short) is None
    off = PrepareSection.model_validate({"language": {"enabled": False}, "c4_quality": {"enabled": False}})
    assert [n for n, _ in F.build_filters(off)] == ["gopher_repetition", "gopher_quality", "fineweb_quality"]


def test_language_model_is_the_bundled_file():
    path = F.lid_model_path()
    assert path.name == "lid.176.ftz" and path.is_file()
    step = _filter("language")
    assert F.drop_reason(step, PROSE[3]) is None


# --- dedup ---------------------------------------------------------------------------------------


def _words(rng: random.Random, vocab: list[str], n: int) -> list[str]:
    return [rng.choice(vocab) for _ in range(n)]


def _edit(rng: random.Random, words: list[str], vocab: list[str], frac: float) -> list[str]:
    out = list(words)
    for i in rng.sample(range(len(out)), int(len(out) * frac)):
        out[i] = rng.choice(vocab)
    return out


def _delete(rng: random.Random, words: list[str], frac: float) -> list[str]:
    """Remove a contiguous span (a sentence or paragraph) of `frac` of the words."""
    n = int(len(words) * frac)
    start = rng.randrange(len(words) - n)
    return words[:start] + words[start + n:]


def planted_corpus(seed: int = 0, groups: int = 40, distinct: int = 80, n_words: int = 300):
    """Documents with planted duplicates: each group is an original plus one exact or near copy.

    Near copies: a line appended, 5% of the words deleted as one span, 1% or 2% of the words
    replaced at random places. (Random replacements of 3% of the words bring the 5-gram Jaccard
    similarity to about 0.74, where 14 x 8 MinHash detects only about 70%: FineWeb's parameters
    aim at ~0.75 and above.)
    """
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "de", "po", "an", "el", "or", "un", "ix"]
    vocab = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(6000)})
    docs, kinds = [], ["exact", "appended", "deleted5", "edited1", "edited2"]
    for g in range(groups):
        words = _words(rng, vocab, n_words)
        kind = kinds[g % len(kinds)]
        copy = {"exact": words, "appended": words + ["\n"] + _words(rng, vocab, 12),
                "deleted5": _delete(rng, words, 0.05), "edited1": _edit(rng, words, vocab, 0.01),
                "edited2": _edit(rng, words, vocab, 0.02)}[kind]
        docs.append({"id": f"group{g}-orig", "text": " ".join(words)})
        docs.append({"id": f"group{g}-{kind}", "text": " ".join(copy)})
    for d in range(distinct):
        docs.append({"id": f"distinct{d}", "text": " ".join(_words(rng, vocab, n_words))})
    rng.shuffle(docs)
    return docs


def _write_jsonl(folder: Path, docs: list[dict], files: int = 2) -> None:
    folder.mkdir(parents=True)
    for i in range(files):
        with gzip.open(folder / f"{i:05d}.jsonl.gz", "wt") as f:
            for doc in docs[i::files]:
                f.write(json.dumps(doc) + "\n")


def _read_ids(folder: Path) -> list[str]:
    ids = []
    for path in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(path, "rt") as f:
            ids += [json.loads(line)["id"] for line in f]
    return ids


def test_bookkeeping_key_follows_the_inputs_not_where_they_lie(tmp_path):
    """A moved run keeps datatrove's completion markers; another config or another input does not."""
    for root in ("here", "moved"):
        (tmp_path / root / "warc").mkdir(parents=True)
        (tmp_path / root / "warc" / "crawl.warc.gz").write_bytes(b"x" * 10)
    cfg = PrepareSection()
    here, moved = ([tmp_path / root / "warc", tmp_path / root / "wet"] for root in ("here", "moved"))
    assert work_hash(cfg, here) == work_hash(cfg, moved)
    assert work_hash(cfg, here) != work_hash(PrepareSection(tasks=3), here)
    (tmp_path / "moved" / "warc" / "crawl.warc.gz").write_bytes(b"x" * 11)
    assert work_hash(cfg, here) != work_hash(cfg, moved)


def test_minhash_dedup_recall_on_planted_duplicates(tmp_path):
    docs = planted_corpus()
    _write_jsonl(tmp_path / "in", docs)
    cfg = PrepareSection(tasks=2, workers=2)
    runner = Runner(cfg, tmp_path / "logs")
    deduplicate(cfg, runner, tmp_path / "in", tmp_path / "out", tmp_path / "data")

    kept = _read_ids(tmp_path / "out")
    assert len(kept) == len(set(kept))
    assert {f"distinct{d}" for d in range(80)} <= set(kept)  # no distinct document removed
    groups: dict[str, list[str]] = {}
    for doc_id in kept:
        if doc_id.startswith("group"):
            groups.setdefault(doc_id.split("-")[0], []).append(doc_id)
    assert len(groups) == 40  # every group keeps at least one document
    near = [g for g in range(40) if g % 5 != 0]  # groups with a near (not exact) copy
    found = sum(len(groups[f"group{g}"]) == 1 for g in near)
    assert found / len(near) >= 0.9, f"near-duplicate recall {found}/{len(near)}"
    assert all(len(groups[f"group{g}"]) == 1 for g in range(0, 40, 5))  # exact copies all removed


def test_of_duplicates_the_one_from_the_earliest_crawl_part_is_kept(tmp_path):
    """A refresh's new page that copies (exactly or nearly) a page crawled before is the one dropped."""
    rng = random.Random(1)
    docs, first = planted_corpus(groups=30, distinct=20), {}
    for doc in docs:  # of each original and its copy, one at random comes from the older crawl part
        group = doc["id"].split("-")[0]
        older = first.setdefault(group, rng.choice(["orig", "copy"])) == ("orig" if doc["id"].endswith("orig") else "copy")
        doc["metadata"] = {"file_path": f"part-{0 if older else 1:05d}.warc.gz"}
    _write_jsonl(tmp_path / "in", docs)
    cfg = PrepareSection(tasks=2, workers=2)
    deduplicate(cfg, Runner(cfg, tmp_path / "logs"), tmp_path / "in", tmp_path / "out", tmp_path / "data")

    kept: dict[str, list[str]] = {}
    for path in sorted((tmp_path / "out").glob("*.jsonl.gz")):
        with gzip.open(path, "rt") as f:
            for doc in map(json.loads, f):
                kept.setdefault(doc["id"].split("-")[0], []).append(doc["metadata"]["file_path"])
    deduplicated = [files for group, files in kept.items() if group.startswith("group") and len(files) == 1]
    assert len(deduplicated) >= 27  # recall, as above
    assert all(files == ["part-00000.warc.gz"] for files in deduplicated)
    assert sum(group.startswith("distinct") for group in kept) == 20


def test_exact_dedup_alone_removes_only_identical_texts(tmp_path):
    docs = [{"id": "a", "text": "one two three four five six"}, {"id": "b", "text": "one  two three\nfour five six"},
            {"id": "c", "text": "one two three four five seven"}, {"id": "d", "text": "something else entirely"}]
    _write_jsonl(tmp_path / "in", docs, files=1)
    cfg = PrepareSection.model_validate({"tasks": 1, "workers": 1, "minhash": {"enabled": False}})
    deduplicate(cfg, Runner(cfg, tmp_path / "logs"), tmp_path / "in", tmp_path / "out", tmp_path / "data")
    kept = sorted(_read_ids(tmp_path / "out"))
    assert kept in (["a", "c", "d"], ["b", "c", "d"])


# --- the stage -----------------------------------------------------------------------------------


def _html(title: str, body: str) -> bytes:
    paragraphs = "".join(f"<p>{p}</p>" for p in body.split("\n"))
    return (f"<html><head><title>{title}</title></head><body><nav><a href='/'>Home</a> | <a href='/about'>About</a>"
            f"</nav><article><h1>{title}</h1>{paragraphs}</article><footer>Copyright 2024</footer></body></html>"
            ).encode()


def write_warc(path: Path, pages: list[tuple[str, bytes]]) -> None:
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=True)
        for url, body in pages:
            headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
            record = writer.create_warc_record(url, "response", payload=BytesIO(body), http_headers=headers)
            writer.write_record(record)


def write_records(path: Path, records: list[tuple[str, bytes, str]]) -> None:
    """Response records with their own Content-Type headers and no payload-type header (as old crawls)."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=True)
        for url, body, content_type in records:
            headers = StatusAndHeaders("200 OK", [("Content-Type", content_type)], protocol="HTTP/1.1")
            writer.write_record(writer.create_warc_record(url, "response", payload=BytesIO(body), http_headers=headers))


def test_bad_pages_are_skipped_and_counted_by_reason_and_odd_encodings_decoded(tmp_path):
    pages = _site_pages()[:4]
    accented = PROSE[1].replace("Bakers", "Naïve bakers at the café")
    records = [(url, body, "text/html; charset=utf-8") for url, body in pages] + [
        ("http://example.test/empty.html", b"  \n ", "text/html"),
        ("http://example.test/binary.html", b"<html>" + os.urandom(2000) + b"\x00\x00", "text/html"),
        ("http://example.test/bad-utf8.html", b"<html><body><p>caf\xc3 \xff\xfe au lait</p>" + b"\x81\xfe" * 50, "text/html; charset=utf-8"),
        ("http://example.test/huge.html", b"<html><body>" + b"<p>many words here</p>" * 60_000, "text/html"),
        ("http://example.test/cp1252.html", _html("Café", accented + "\n" + PROSE[3]).decode().encode("cp1252"),
         "text/html; charset=windows-1252"),
        ("http://example.test/utf16.html", _html("Page 16", PROSE[2] + "\n" + PROSE[0]).decode().encode("utf-16"), "text/html"),
        ("http://example.test/logo.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "image/png"),
    ]
    run_dir = RunDir(tmp_path / "run")
    write_records(run_dir.warc_dir / "part-00000.warc.gz", records)
    cfg = PrepareSection(tasks=2, workers=2, max_page_bytes=1_000_000, language={"enabled": False})
    counts = prepare_stage(_ctx(run_dir), cfg)
    assert counts["pages_skipped"] == {"binary": 1, "empty": 1, "not_html": 1, "too_large": 1, "undecodable": 1}
    assert counts["pages_in"] == 6  # four good pages, the windows-1252 and the UTF-16 one
    texts = [json.loads(line)["text"] for path in sorted(run_dir.documents_dir.glob("*.jsonl.gz"))
             for line in gzip.open(path, "rt", encoding="utf-8")]
    assert any("Naïve bakers at the café" in text for text in texts)  # decoded by its declared charset


def _site_pages() -> list[tuple[str, bytes]]:
    long = [p + "\n" + q for p, q in zip(PROSE, PROSE[1:] + PROSE[:1])]  # two paragraphs per page
    pages = [(f"http://example.test/page{i}.html", _html(f"Page {i}", text)) for i, text in enumerate(long)]
    pages.append(("http://example.test/copy.html", pages[0][1]))  # exact duplicate
    near = long[1].replace("Bakers often fold it", "Bakers usually fold it")
    pages.append(("http://example.test/near.html", _html("Page 1", near)))  # near duplicate
    pages.append(("http://example.test/fr.html", _html("Le village", FRENCH + "\n" + FRENCH.replace("pommes", "prunes"))))
    pages.append(("http://example.test/lorem.html", _html("Lorem", PROSE[2] + "\nLorem ipsum dolor sit amet.")))
    pages.append(("http://example.test/nav.html", _html("Links", "Home\nAbout\nContact")))
    return pages


def _ctx(run_dir: RunDir) -> SimpleNamespace:
    """What the executor gives prepare: its folder and its inputs, the crawl stage's WARC and WET folders and
    its pages.jsonl (absent here: every record is read)."""
    return SimpleNamespace(run_dir=run_dir, out_dir=run_dir.stage("prepare"), seed=0,
                           inputs={"warc": run_dir.warc_dir, "wet": run_dir.wet_dir, "pages": run_dir.crawl_pages})


@pytest.mark.parametrize("output_format", ["jsonl", "parquet"])
def test_prepare_stage_on_a_warc(tmp_path, output_format):
    run_dir = RunDir(tmp_path / "run")
    write_warc(run_dir.warc_dir / "part-00000.warc.gz", _site_pages())
    cfg = PrepareSection(tasks=2, workers=2, output_format=output_format)
    ctx = _ctx(run_dir)
    counts = prepare_stage(ctx, cfg)

    funnel = counts["kept_after"]
    assert counts["pages_in"] == 9
    assert counts["filters"]["language"]["reasons"] == {"language": 2}  # French, and the page of three links
    assert counts["filters"]["c4_quality"]["reasons"].get("lorem_ipsum") == 1
    assert counts["exact_dedup"]["dropped"] == 1
    assert counts["minhash_dedup"]["dropped"] == 1
    assert funnel["written"] == counts["documents"] == 4  # the four distinct prose pages
    assert counts["text_bytes"] > 1000
    assert list(funnel) == ["extracted", "language", "gopher_repetition", "gopher_quality", "c4_quality",
                            "fineweb_quality", "exact_dedup", "minhash_dedup", "written"]
    assert all(a >= b for a, b in zip(list(funnel.values()), list(funnel.values())[1:]))
    docs, text_bytes, files = count_documents(run_dir.documents_dir)
    assert (docs, text_bytes) == (4, counts["text_bytes"]) and files >= 1
    if output_format == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(sorted(run_dir.documents_dir.glob("*.parquet"))[0])
        assert "text" in table.column_names

    # a rerun finds every datatrove rank completed and changes nothing
    before = {p.name: p.read_bytes() for p in run_dir.documents_dir.iterdir()}
    assert prepare_stage(ctx, cfg)["documents"] == 4
    assert {p.name: p.read_bytes() for p in run_dir.documents_dir.iterdir()} == before


def test_pages_extracted_before_come_from_the_cache_and_make_the_same_documents(tmp_path):
    import sqlite3

    run_dir = RunDir(tmp_path / "run")
    write_warc(run_dir.warc_dir / "part-00000.warc.gz", _site_pages())
    cfg, ctx = PrepareSection(tasks=2, workers=2), _ctx(run_dir)
    documents = lambda: {p.name: p.read_bytes() for p in run_dir.documents_dir.iterdir()}  # noqa: E731

    def from_scratch() -> dict:  # the bookkeeping and the documents go; the extraction cache stays
        shutil.rmtree(run_dir.stage("prepare") / ".datatrove")
        shutil.rmtree(run_dir.documents_dir)
        return prepare_stage(ctx, cfg)

    first = prepare_stage(ctx, cfg)
    assert first["timing"]["pages_reused"] == 0 and run_dir.extraction_cache.is_file()
    written = documents()
    again = from_scratch()
    assert again["timing"]["pages_reused"] == again["pages_in"] == 9  # pages with no main text are cached too
    assert documents() == written
    assert {k: v for k, v in again.items() if k != "timing"} == {k: v for k, v in first.items() if k != "timing"}

    with sqlite3.connect(run_dir.extraction_cache) as db:  # a damaged entry is not used: the page is extracted again
        assert db.execute("UPDATE extractions SET text = 'tampered' WHERE text LIKE '%Lorem ipsum%'").rowcount == 1
    assert from_scratch()["timing"]["pages_reused"] == 8 and documents() == written
    assert from_scratch()["timing"]["pages_reused"] == 9  # and the entry is repaired

    new_page = ("http://example.test/new.html", _html("New", PROSE[2] + "\n" + PROSE[0]))
    write_warc(run_dir.warc_dir / "part-00001.warc.gz", [new_page])  # a refresh found one new page
    refreshed = from_scratch()
    assert (refreshed["pages_in"], refreshed["timing"]["pages_reused"]) == (10, 9)
    assert refreshed["documents"] == 5, refreshed


@pytest.mark.slow
def test_prepare_on_the_ray_executor(tmp_path):
    """The same pipeline on a local Ray instance (ray comes with the dev extra; skipped without it)."""
    ray = pytest.importorskip("ray")
    run_dir = RunDir(tmp_path / "run")
    write_warc(run_dir.warc_dir / "part-00000.warc.gz", _site_pages())
    cfg = PrepareSection.model_validate({"executor": "ray", "tasks": 2, "workers": 2,
                                         "minhash": {"num_buckets": 4, "hashes_per_bucket": 4}})
    ctx = _ctx(run_dir)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        counts = prepare_stage(ctx, cfg)
    finally:
        ray.shutdown()
    assert counts["documents"] == 4 and counts["exact_dedup"]["dropped"] == 1


def test_prepare_reads_wet_files_from_warc_inputs(tmp_path):
    """Common Crawl's WET files (extracted text): given as crawl.warc_inputs, no HTML extraction."""
    from warcio.warcwriter import WARCWriter

    from llmpipe.data.crawl import ingest_warc_inputs

    source = tmp_path / "CC-MAIN-test-00000.warc.wet.gz"
    with open(source, "wb") as f:
        writer = WARCWriter(f, gzip=True)
        for i, text in enumerate(PROSE + [PROSE[0], FRENCH]):
            writer.write_record(writer.create_warc_record(
                f"http://example.test/{i}", "conversion", payload=BytesIO(text.encode()),
                warc_content_type="text/plain", warc_headers_dict={"WARC-Identified-Payload-Type": "text/plain"}))
    run_dir = RunDir(tmp_path / "run")
    assert ingest_warc_inputs([str(source)], run_dir.stage("crawl")) == {"wet_files": 1,
                                                                           "input_bytes": source.stat().st_size}
    cfg = PrepareSection(tasks=2, workers=2)
    counts = prepare_stage(_ctx(run_dir), cfg)
    assert "pages_in" not in counts  # no trafilatura step
    assert counts["filters"]["language"]["in"] == 6
    assert counts["filters"]["language"]["dropped"] == 1
    assert counts["exact_dedup"]["dropped"] == 1
    assert counts["documents"] == 4


def test_slurm_executor_submits_a_dependent_chain(tmp_path, monkeypatch):
    """prepare.executor=slurm: every datatrove job is pickled and sbatch'ed after the previous one."""
    import dill
    from datatrove.executor import slurm

    launches = []

    def fake_sbatch(contents, job_id_retriever, *args):
        launches.append((contents, args))
        return str(1000 + len(launches))

    def incomplete(self, ranks=None, skip_completed=None):
        return [] if self.job_id else list(range(self.world_size))

    monkeypatch.setattr(slurm, "launch_slurm_job", fake_sbatch)
    monkeypatch.setattr(slurm.SlurmPipelineExecutor, "get_incomplete_ranks", incomplete)
    run_dir = RunDir(tmp_path / "run")
    write_warc(run_dir.warc_dir / "part-00000.warc.gz", _site_pages())
    cfg = PrepareSection.model_validate({"executor": "slurm", "slurm": {"partition": "cpu", "time": "01:00:00"}})
    prepare_stage(_ctx(run_dir), cfg)

    jobs = [(contents, args) for contents, args in launches if "launch_pickled_pipeline" in contents]
    assert len(jobs) == 8  # extract+filter, 3 exact dedup, 3 MinHash, write
    ids = [str(1000 + i + 1) for i, (contents, _) in enumerate(launches)]
    job_ids = [job_id for job_id, (contents, _) in zip(ids, launches) if "launch_pickled_pipeline" in contents]
    for previous, (_, args) in zip(job_ids, jobs[1:]):
        assert f"--dependency=afterok:{previous}" in args
    assert all("#SBATCH --partition=cpu" in contents for contents, _ in jobs)
    pickles = sorted((run_dir.stage("prepare") / ".datatrove").rglob("executor.pik"))
    assert len(pickles) == 8
    with open(pickles[0], "rb") as f:
        assert dill.load(f).pipeline  # the steps (our reader and filters included) unpickle
