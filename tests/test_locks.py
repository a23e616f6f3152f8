"""Digest lock files: read back what was written, refuse malformed entries, serialise concurrent writers."""

from __future__ import annotations

import multiprocessing

import pytest

from sbssl.locks import exclusive, read_digest_lock, write_digest_lock

HEADER = "# test lock\n"


def _add(path: str, name: str) -> None:
    with exclusive(path):
        entries = read_digest_lock(path)
        entries[name] = {"url": f"https://example.org/{name}", "sha256": f"{len(name):064x}"}
        write_digest_lock(path, entries, HEADER)


def test_round_trip_sorted_with_header(tmp_path):
    lock = tmp_path / "x.lock"
    assert read_digest_lock(lock) == {}
    write_digest_lock(lock, {"b": {"url": "file:///b", "sha256": "b" * 64}, "a": {"url": "file:///a", "sha256": "a" * 64}}, HEADER)
    text = lock.read_text()
    assert text.startswith(HEADER) and text.index("a:") < text.index("b:")
    assert read_digest_lock(lock) == {"a": {"url": "file:///a", "sha256": "a" * 64}, "b": {"url": "file:///b", "sha256": "b" * 64}}


@pytest.mark.parametrize(
    "text,match",
    [
        ("a: {url: u}\n", r"entry 'a': expected exactly the keys"),
        ("a: {url: u, sha256: ABC}\n", r"entry 'a': sha256 'ABC' is not 64 lower-case hex"),
        ("- a\n", "expected a mapping"),
        ("a: {url: u, sha256: x}\na: {url: v, sha256: y}\n", "second time"),
    ],
)
def test_malformed_locks_name_the_file(tmp_path, text, match):
    lock = tmp_path / "bad.lock"
    lock.write_text(text)
    with pytest.raises(ValueError, match=match) as error:
        read_digest_lock(lock)
    assert str(lock) in str(error.value)


def test_concurrent_writers_keep_every_entry(tmp_path):
    lock = str(tmp_path / "c.lock")
    names = [f"m{i}" for i in range(10)]
    with multiprocessing.get_context("fork").Pool(4) as pool:
        pool.starmap(_add, [(lock, n) for n in names])
    assert sorted(read_digest_lock(lock)) == sorted(names)
