"""What every config section shares: unknown keys are errors, values are immutable, a digest for the cache key."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict

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


