"""The manifest written next to every output: what was run, on what data, with what, and what was dropped."""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from sftune.config import Config

LIBRARIES = ("sftune", "torch", "transformers", "tokenizers", "safetensors", "datasets", "peft", "accelerate")


def sha256_of(path: str | None) -> str | None:
    """sha256 of a local data file; None for a datasets name (its revision is what identifies it)."""
    if not path or not Path(path).is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def write_manifest(path: Path, config: Config, extra: dict[str, Any]) -> Path:
    manifest = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config.model_dump(mode="json"),
        "data_sha256": {"train": sha256_of(config.data.train), "validation": sha256_of(config.data.validation)},
        "versions": library_versions(),
        "seed": config.train.seed,
        **extra,
    }
    path.write_text(json.dumps(manifest, indent=2, default=str))
    return path
