"""Verified, atomic, resumable-by-skipping downloads over http(s) and file:// (standard library only)."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from sbssl.io import atomic_path

_CHUNK = 1 << 20


class HashMismatchError(ValueError):
    """The downloaded bytes do not have the expected digest (never retried: the source itself is wrong)."""


def _mismatch(path: Path, sha256: str | None, sha256_prefix: str | None, md5_prefix: str | None) -> str | None:
    """None when ``path`` matches every given expectation, else a message with expected and actual digests."""
    wanted = {"sha256": bool(sha256 or sha256_prefix), "md5": bool(md5_prefix)}
    if not any(wanted.values()):
        return None
    hashers = {name: hashlib.new(name, usedforsecurity=False) for name, want in wanted.items() if want}
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            for hasher in hashers.values():
                hasher.update(block)
    actual = {name: hasher.hexdigest() for name, hasher in hashers.items()}
    problems = []
    if sha256 and actual["sha256"] != sha256.lower():
        problems.append(f"sha256 expected {sha256.lower()}, got {actual['sha256']}")
    if sha256_prefix and not actual["sha256"].startswith(sha256_prefix.lower()):
        problems.append(f"sha256 expected to start with {sha256_prefix.lower()}, got {actual['sha256']}")
    if md5_prefix and not actual["md5"].startswith(md5_prefix.lower()):
        problems.append(f"md5 expected to start with {md5_prefix.lower()}, got {actual['md5']}")
    return "; ".join(problems) or None


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
) -> Path:
    """Fetch ``url`` (http, https or file) to ``dest`` and verify it; return ``dest``.

    - A ``dest`` that already exists and matches the given digests is returned at once (no network).
      One that exists but does not match is downloaded again. With no digest given, an existing file is kept.
    - Bytes stream to a temporary file in ``dest``'s folder, renamed onto ``dest`` only once complete and
      verified, so a failure never leaves a partial or unverified ``dest``.
    - Network errors (connection, timeouts, HTTP 5xx/429, short reads) are retried up to ``retries`` times
      with exponential backoff (1 s, 2 s, 4 s, ...). HTTP 4xx and digest mismatches fail at once.
    - A digest mismatch raises :class:`HashMismatchError` (a ValueError) naming the url, expected and actual.
    ``timeout`` is the socket timeout in seconds; ``progress`` shows a tqdm bar (bytes).
    """
    target = Path(dest)
    if target.is_file() and _mismatch(target, sha256, sha256_prefix, md5_prefix) is None:
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
