"""Cache keys of the stages a run caches (expert trajectories, teachers, FP models, statistics,
model pools): each entry is keyed by the settings that determine it."""
from __future__ import annotations

import hashlib
import json


def cache_key(spec: dict) -> str:
    """Stable 16-hex key of ``spec`` (the settings that determine a cached entry): the SHA-1 of its
    JSON with sorted keys (values JSON cannot hold are written with ``str``)."""
    return hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
