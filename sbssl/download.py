"""Verified, atomic, resumable-by-skipping downloads over http(s) and file:// (standard library only), and
file digests cached beside the file so that a large checkpoint is hashed once per version, not once per use."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Mapping

from tqdm import tqdm

from sbssl.io import atomic_path, write_json_atomic

_CHUNK = 1 << 20
_HEX = re.compile(r"[0-9a-f]+")


class HashMismatchError(ValueError):
    """A file does not have the expected digest (a download is never retried on this: the source is wrong)."""


def _hash_file(path: Path, algorithms: tuple[str, ...]) -> dict[str, str]:
    """Hex digests of ``path`` for each named hashlib algorithm, in one read of the file."""
    hashers = {name: hashlib.new(name, usedforsecurity=False) for name in algorithms}
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            for hasher in hashers.values():
                hasher.update(block)
    return {name: hasher.hexdigest() for name, hasher in hashers.items()}


def digest_problems(
    digests: Mapping[str, str], *, sha256: str | None = None, sha256_prefix: str | None = None,
    md5_prefix: str | None = None,
) -> list[str]:
    """What ``digests`` (``{"sha256": hex, "md5": hex}``, lower case) fail of the given expectations, as
    ``"sha256 expected <expected>, got <actual>"`` phrases; empty when all hold. Expectations are case-blind."""
    problems = []
    if sha256 and digests["sha256"] != sha256.lower():
        problems.append(f"sha256 expected {sha256.lower()}, got {digests['sha256']}")
    if sha256_prefix and not digests["sha256"].startswith(sha256_prefix.lower()):
        problems.append(f"sha256 expected to start with {sha256_prefix.lower()}, got {digests['sha256']}")
    if md5_prefix and not digests["md5"].startswith(md5_prefix.lower()):
        problems.append(f"md5 expected to start with {md5_prefix.lower()}, got {digests['md5']}")
    return problems


def _mismatch(path: Path, sha256: str | None, sha256_prefix: str | None, md5_prefix: str | None) -> str | None:
    """None when ``path`` matches every given expectation, else a message with expected and actual digests."""
    wanted = tuple(name for name, want in (("sha256", sha256 or sha256_prefix), ("md5", md5_prefix)) if want)
    if not wanted:
        return None
    problems = digest_problems(
        _hash_file(path, wanted), sha256=sha256, sha256_prefix=sha256_prefix, md5_prefix=md5_prefix
    )
    return "; ".join(problems) or None


def digest_cache_path(path: str | os.PathLike[str]) -> Path:
    """The sidecar that :func:`file_digests` keeps beside ``path``: ``<path>.digest.json``."""
    file = Path(path)
    return file.with_name(file.name + ".digest.json")


def _stat_key(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def file_digests(path: str | os.PathLike[str]) -> dict[str, str]:
    """``{"sha256": hex, "md5": hex}`` of a file, hashed once per version of the file.

    The digests are cached in :func:`digest_cache_path` (JSON: size, mtime_ns, inode, sha256, md5) and reused
    while the file's size, modification time (ns) and inode are unchanged; any change (a new download is a
    new inode, an edit a new mtime) means a fresh hash. The cache guards against accidents, not against
    someone forging both file and sidecar. A folder that cannot be written only loses the caching.
    """
    file = Path(path)
    cache = digest_cache_path(file)
    key = _stat_key(file)
    try:
        cached = json.loads(cache.read_text(encoding="utf-8"))
        if isinstance(cached, dict) and all(cached.get(k) == v for k, v in key.items()):
            digests = {"sha256": cached["sha256"], "md5": cached["md5"]}
            if all(isinstance(v, str) and _HEX.fullmatch(v) for v in digests.values()):
                return digests
    except (OSError, ValueError, KeyError):
        pass  # absent or unreadable cache: hash below
    digests = _hash_file(file, ("sha256", "md5"))
    if _stat_key(file) == key:  # not cached when the file changed while it was read
        with contextlib.suppress(OSError):
            write_json_atomic(cache, {**key, **digests})
    return digests


def download(
    url: str,
    dest: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    sha256_prefix: str | None = None,
    md5_prefix: str | None = None,
    retries: int = 3,
    timeout: float = 60,
    progress: bool = True,
    keep_present: bool = True,
) -> Path:
    """Fetch ``url`` (http, https or file) to ``dest`` and verify it; return ``dest``.

    - A ``dest`` that already exists and matches the given digests is returned at once (no network).
      One that exists but does not match is downloaded again. With no digest given, an existing file is kept.
      ``keep_present=False`` downloads in every case (for callers that have judged the present file).
    - Bytes stream to a temporary file in ``dest``'s folder, renamed onto ``dest`` only once complete and
      verified, so a failure never leaves a partial or unverified ``dest``.
    - Network errors (connection, timeouts, HTTP 5xx/429, short reads) are retried up to ``retries`` times
      with exponential backoff (1 s, 2 s, 4 s, ...). HTTP 4xx and digest mismatches fail at once.
    - A digest mismatch raises :class:`HashMismatchError` (a ValueError) naming the url, expected and actual.
    ``timeout`` is the socket timeout in seconds; ``progress`` shows a tqdm bar (bytes).
    """
    target = Path(dest)
    if keep_present and target.is_file() and _mismatch(target, sha256, sha256_prefix, md5_prefix) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    attempt = 0
    while True:
        try:
            with atomic_path(target) as tmp:
                _fetch(url, tmp, timeout=timeout, progress=progress, label=target.name)
                problem = _mismatch(tmp, sha256, sha256_prefix, md5_prefix)
                if problem:
                    raise HashMismatchError(f"{url}: downloaded file does not verify ({problem}); not saved")
            return target
        except HashMismatchError:
            raise
        except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError
            if not _transient(exc) or attempt >= retries:
                raise OSError(f"{url}: download failed after {attempt + 1} attempt(s): {exc}") from exc
            time.sleep(2**attempt)
            attempt += 1


def _transient(exc: BaseException) -> bool:
    """Whether retrying may help: server-side or connection trouble, not a missing file or a refusal."""
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code in (408, 429)
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, FileNotFoundError):
        return False
    return not isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError))


def _fetch(url: str, out: Path, *, timeout: float, progress: bool, label: str) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "sbssl"})
    with contextlib.ExitStack() as stack:
        response = stack.enter_context(urllib.request.urlopen(request, timeout=timeout))
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        bar = stack.enter_context(
            tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, disable=not progress)
        )
        received = 0
        with open(out, "wb") as sink:
            while block := response.read(_CHUNK):
                sink.write(block)
                received += len(block)
                bar.update(len(block))
        if total is not None and received != total:
            raise ConnectionError(f"connection closed after {received} of {total} bytes")
