"""Lock files of full sha256 digests, pinned on the first fetch of a file that has no published digest.

Format (YAML, sorted by name, a comment header): ``<name>: {url: <source>, sha256: <64 hex>}``. The weights
lock (sbssl.models, one entry per zoo model) and the data lock (sbssl.coco, sbssl.debias: one entry per
archive) share it. Writers serialise on an ``flock`` of the sidecar ``.<lock>.flock``, re-read, merge and
rewrite atomically, so concurrent fetch jobs keep each other's entries.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import yaml

from sbssl.io import read_yaml, write_text_atomic

_SHA256 = re.compile(r"[0-9a-f]{64}")


@contextlib.contextmanager
def exclusive(lock_path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the sidecar ``.<lock>.flock`` beside ``lock_path`` (created if needed)."""
    lock = Path(lock_path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock.with_name(f".{lock.name}.flock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_digest_lock(path: str | os.PathLike[str], what: str = "data lock") -> dict[str, dict[str, str]]:
    """``{name: {"url", "sha256"}}`` of a lock file; ``{}`` when absent or empty. ValueError naming the file
    and the entry for anything else than entries with exactly a URL and a 64-hex sha256."""
    file = Path(path)
    data = read_yaml(file, what) if file.exists() else None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{file}: expected a mapping of name -> {{url, sha256}}")
    entries = {}
    for name, entry in data.items():
        if not isinstance(entry, Mapping) or set(entry) != {"url", "sha256"}:
            raise ValueError(f"{file}: entry {name!r}: expected exactly the keys ['sha256', 'url']")
        if not (isinstance(entry["sha256"], str) and _SHA256.fullmatch(entry["sha256"])):
            raise ValueError(f"{file}: entry {name!r}: sha256 {entry['sha256']!r} is not 64 lower-case hex digits")
        entries[str(name)] = {"url": str(entry["url"]), "sha256": entry["sha256"]}
    return entries


def write_digest_lock(path: str | os.PathLike[str], entries: Mapping[str, Mapping[str, str]], header: str) -> None:
    """Rewrite a lock atomically: ``header`` (comment lines) and the entries sorted by name. Call it under
    :func:`exclusive` after re-reading the file, so that no concurrent entry is lost."""
    body = yaml.safe_dump(
        {name: {"url": entries[name]["url"], "sha256": entries[name]["sha256"]} for name in sorted(entries)},
        sort_keys=False, width=10_000,
    )  # fmt: skip
    write_text_atomic(path, header + body)
