from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pandas as pd
import pytest

from sbssl.download import HashMismatchError, digest_cache_path, digest_problems, download, file_digests
from sbssl.stimuli import IEAT_FILE_HASHES, fetch_stimuli, git_blob_sha1, read_file_hashes, sha256_file

PAYLOAD = bytes(range(256)) * 4000  # ~1 MB, several read chunks
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()


class Server:
    """A real HTTP server on 127.0.0.1 with scripted failures, counting requests per path."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.fail_first: Counter[str] = Counter()  # path -> number of 503 answers before success
        self.truncate: set[str] = set()  # paths answered with half the announced bytes
        self.hits: Counter[str] = Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                server.hits[self.path] += 1
                if server.fail_first[self.path] > 0:
                    server.fail_first[self.path] -= 1
                    self.send_error(503, "try again")
                    return
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if self.path in server.truncate else body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server() -> Iterator[Server]:
    srv = Server()
    srv.files["/w.pth"] = PAYLOAD
    yield srv
    srv.close()


def _only(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_http_download_verifies_every_digest(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "pretrains" / "w.pth"
    got = download(
        server.base + "/w.pth", dest, sha256=PAYLOAD_SHA, sha256_prefix=PAYLOAD_SHA[:8], md5_prefix=PAYLOAD_MD5[:8],
        progress=False,
    )
    assert got == dest and dest.read_bytes() == PAYLOAD
    assert _only(dest.parent) == ["w.pth"]


def test_file_url(tmp_path: Path) -> None:
    source = tmp_path / "src.bin"
    source.write_bytes(PAYLOAD)
    dest = download(source.as_uri(), tmp_path / "out" / "copy.bin", sha256=PAYLOAD_SHA.upper(), progress=False)
    assert dest.read_bytes() == PAYLOAD
    with pytest.raises(OSError, match="missing.bin"):
        download((tmp_path / "missing.bin").as_uri(), tmp_path / "out" / "x.bin", progress=False)
    assert _only(tmp_path / "out") == ["copy.bin"]


@pytest.mark.parametrize("kind", ["sha256", "sha256_prefix", "md5_prefix"])
def test_hash_mismatch_names_url_expected_actual_and_keeps_nothing(server: Server, tmp_path: Path, kind: str) -> None:
    wrong = {"sha256": "0" * 64, "sha256_prefix": "deadbeef", "md5_prefix": "deadbeef"}[kind]
    actual = PAYLOAD_MD5 if kind == "md5_prefix" else PAYLOAD_SHA
    url = server.base + "/w.pth"
    with pytest.raises(HashMismatchError) as info:
        download(url, tmp_path / "w.pth", progress=False, **{kind: wrong})
    message = str(info.value)
    assert url in message and wrong in message and actual in message
    assert isinstance(info.value, ValueError)
    assert _only(tmp_path) == []
    assert server.hits["/w.pth"] == 1  # a wrong digest is not retried


def test_retry_after_transient_server_error(server: Server, tmp_path: Path) -> None:
    server.fail_first["/w.pth"] = 1
    dest = download(server.base + "/w.pth", tmp_path / "w.pth", sha256=PAYLOAD_SHA, retries=2, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.hits["/w.pth"] == 2


def test_not_found_is_not_retried(server: Server, tmp_path: Path) -> None:
    with pytest.raises(OSError, match=r"/nope\.pth.*404"):
        download(server.base + "/nope.pth", tmp_path / "nope.pth", retries=3, progress=False)
    assert server.hits["/nope.pth"] == 1
    assert _only(tmp_path) == []


def test_truncated_transfer_leaves_no_partial_file(server: Server, tmp_path: Path) -> None:
    server.truncate.add("/w.pth")
    dest = tmp_path / "w.pth"
    with pytest.raises(OSError, match=r"w\.pth"):
        download(server.base + "/w.pth", dest, retries=0, progress=False)
    assert server.hits["/w.pth"] == 1
    assert _only(tmp_path) == []
    # an older file at dest is left untouched by a failed re-download
    dest.write_bytes(b"old")
    with pytest.raises(OSError):
        download(server.base + "/w.pth", dest, sha256=PAYLOAD_SHA, retries=0, progress=False)
    assert dest.read_bytes() == b"old" and _only(tmp_path) == ["w.pth"]


def test_present_verified_file_is_not_downloaded_again(server: Server, tmp_path: Path) -> None:
    url, dest = server.base + "/w.pth", tmp_path / "w.pth"
    download(url, dest, sha256_prefix=PAYLOAD_SHA[:8], progress=False)
    download(url, dest, sha256_prefix=PAYLOAD_SHA[:8], progress=False)
    assert server.hits["/w.pth"] == 1
    # a present file that does not verify is replaced
    dest.write_bytes(b"corrupted")
    download(url, dest, sha256_prefix=PAYLOAD_SHA[:8], progress=False)
    assert server.hits["/w.pth"] == 2 and dest.read_bytes() == PAYLOAD

    # unless the caller asks for a fresh copy (it judged the present file itself)
    download(url, dest, sha256_prefix=PAYLOAD_SHA[:8], progress=False, keep_present=False)
    assert server.hits["/w.pth"] == 3


# --- cached file digests --------------------------------------------------------------------------------------


def _count_hashing(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    import sbssl.download

    calls: list[Path] = []
    real = sbssl.download._hash_file
    monkeypatch.setattr(sbssl.download, "_hash_file", lambda path, algos: calls.append(path) or real(path, algos))
    return calls


def test_file_digests_are_cached_per_file_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    calls = _count_hashing(monkeypatch)
    path = tmp_path / "w.pth"
    path.write_bytes(PAYLOAD)
    want = {"sha256": PAYLOAD_SHA, "md5": PAYLOAD_MD5}
    assert file_digests(path) == want and file_digests(path) == want
    assert calls == [path]
    sidecar = json.loads(digest_cache_path(path).read_text())
    assert digest_cache_path(path).name == "w.pth.digest.json"
    assert sidecar == {**want, "size": len(PAYLOAD), "mtime_ns": path.stat().st_mtime_ns, "inode": path.stat().st_ino}
    # same size and the old mtime, but a new file put in place (new inode): hashed again
    stat = path.stat()
    changed = PAYLOAD[::-1]
    replacement = tmp_path / "new"
    replacement.write_bytes(changed)
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(replacement, path)
    assert file_digests(path)["sha256"] == hashlib.sha256(changed).hexdigest()
    assert len(calls) == 2
    # an edit in place (new mtime) and a damaged sidecar are noticed too
    path.write_bytes(PAYLOAD)
    assert file_digests(path) == want and len(calls) == 3
    digest_cache_path(path).write_text("{not json")
    assert file_digests(path) == want and len(calls) == 4
    assert file_digests(path) == want and len(calls) == 4


def test_digest_problems_names_expected_and_actual() -> None:
    digests = {"sha256": PAYLOAD_SHA, "md5": PAYLOAD_MD5}
    assert digest_problems(digests, sha256=PAYLOAD_SHA.upper(), sha256_prefix=PAYLOAD_SHA[:6],
                           md5_prefix=PAYLOAD_MD5[:6]) == []
    assert digest_problems(digests) == []
    assert digest_problems(digests, sha256="0" * 64, md5_prefix="ffff") == [
        f"sha256 expected {'0' * 64}, got {PAYLOAD_SHA}", f"md5 expected to start with ffff, got {PAYLOAD_MD5}",
    ]


# --- fetch_stimuli ------------------------------------------------------------------------------------------

TREE = {
    "cat/a/one.jpg": b"\xff\xd8 first image bytes",
    "cat/a/two.png": b"\x89PNG second image bytes",
    "cat/b/three.webp": b"RIFF third image bytes",
}


def _tar_gz(members: dict[str, bytes], *, links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buffer.getvalue()


def _ieat_archive(tree: dict[str, bytes] = TREE, **extra: bytes) -> bytes:
    top = "ieat-4d7639b"
    members = {f"{top}/README.md": b"readme", f"{top}/data/other/x.jpg": b"not wanted"}
    members.update({f"{top}/data/experiments/{rel}": data for rel, data in tree.items()})
    members.update(extra)
    return _tar_gz(members)


def _hashes(tree: dict[str, bytes] = TREE) -> dict[str, str]:
    return {rel: hashlib.sha256(data).hexdigest() for rel, data in tree.items()}


def test_fetch_stimuli_extracts_only_the_experiments_tree(server: Server, tmp_path: Path) -> None:
    archive = _ieat_archive()
    server.files["/ieat.tar.gz"] = archive
    dest = fetch_stimuli(
        tmp_path / "stimuli", url=server.base + "/ieat.tar.gz",
        archive_sha256=hashlib.sha256(archive).hexdigest(), file_hashes=_hashes(), progress=False,
    )
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert files == sorted(TREE)
    assert all((dest / rel).read_bytes() == data for rel, data in TREE.items())
    assert _only(tmp_path) == ["stimuli"]  # the archive and work folder are gone
    with pytest.raises(FileExistsError, match="stimuli"):
        fetch_stimuli(dest, url=server.base + "/ieat.tar.gz", file_hashes=None, progress=False)


def test_fetch_stimuli_from_file_url_with_git_blob_ids(tmp_path: Path) -> None:
    archive = tmp_path / "ieat.tar.gz"
    archive.write_bytes(_ieat_archive())
    table = tmp_path / "files.csv"
    rows = [(rel, hashlib.sha256(data).hexdigest(), "") for rel, data in TREE.items()]
    one = tmp_path / "blob"
    one.write_bytes(TREE["cat/a/one.jpg"])
    rows[0] = ("cat/a/one.jpg", "", git_blob_sha1(one))  # only the git id known, as for professional2
    pd.DataFrame(rows, columns=["path", "sha256", "git_blob_sha1"]).to_csv(table, index=False)
    dest = fetch_stimuli(tmp_path / "s", url=archive.as_uri(), file_hashes=table, progress=False)
    assert sha256_file(dest / "cat/a/one.jpg") == hashlib.sha256(TREE["cat/a/one.jpg"]).hexdigest()


def test_fetch_stimuli_rejects_changed_or_missing_files(server: Server, tmp_path: Path) -> None:
    changed = dict(TREE, **{"cat/a/two.png": b"different bytes"})
    server.files["/changed.tar.gz"] = _ieat_archive(changed)
    with pytest.raises(ValueError, match=r"1 differ: cat/a/two\.png"):
        fetch_stimuli(tmp_path / "s", url=server.base + "/changed.tar.gz", file_hashes=_hashes(), progress=False)
    incomplete = {k: v for k, v in TREE.items() if k != "cat/b/three.webp"}
    server.files["/incomplete.tar.gz"] = _ieat_archive(incomplete)
    with pytest.raises(ValueError, match=r"1 missing: cat/b/three\.webp"):
        fetch_stimuli(tmp_path / "s", url=server.base + "/incomplete.tar.gz", file_hashes=_hashes(), progress=False)
    server.files["/empty.tar.gz"] = _tar_gz({"top/README.md": b"x"})
    with pytest.raises(ValueError, match="no files under"):
        fetch_stimuli(tmp_path / "s", url=server.base + "/empty.tar.gz", file_hashes=None, progress=False)
    assert _only(tmp_path) == []


def test_fetch_stimuli_refuses_unsafe_archives(server: Server, tmp_path: Path) -> None:
    server.files["/traversal.tar.gz"] = _ieat_archive(**{"ieat-4d7639b/data/experiments/../../../evil.txt": b"x"})
    with pytest.raises(ValueError, match="unsafe path"):
        fetch_stimuli(tmp_path / "s", url=server.base + "/traversal.tar.gz", file_hashes=None, progress=False)
    server.files["/absolute.tar.gz"] = _tar_gz({"/etc/evil": b"x"})
    with pytest.raises(ValueError, match="unsafe path"):
        fetch_stimuli(tmp_path / "s", url=server.base + "/absolute.tar.gz", file_hashes=None, progress=False)
    server.files["/link.tar.gz"] = _tar_gz({}, links={"ieat-x/data/experiments/cat/a/l.jpg": "/etc/passwd"})
    with pytest.raises(ValueError, match="link"):
        fetch_stimuli(tmp_path / "s", url=server.base + "/link.tar.gz", file_hashes=None, progress=False)
    server.files["/ok.tar.gz"] = _ieat_archive()
    with pytest.raises(HashMismatchError):
        fetch_stimuli(tmp_path / "s", url=server.base + "/ok.tar.gz", archive_sha256="1" * 64, progress=False)
    assert _only(tmp_path) == [] and not (tmp_path.parent / "evil.txt").exists()


def test_shipped_file_hashes_match_the_shared_stimuli(shared_dir: Path) -> None:
    expected = read_file_hashes(IEAT_FILE_HASHES)
    assert len(expected) == 870
    assert expected["gender/career/professional2_google.jpg"] == "git:310b5daa9c36878f2cde1c841cbc31f92abd89e1"
    provenance = pd.read_csv(shared_dir / "ieat" / "stimuli_manifest.csv", keep_default_na=False)
    originals = provenance.loc[provenance["shared_copy"] == "original", "path"]
    stimuli = shared_dir / "ieat" / "stimuli"
    assert len(originals) == 786
    assert all(sha256_file(stimuli / rel) == expected[rel] for rel in originals)
    # and the git blob ids agree with the sha256 for the same bytes
    assert git_blob_sha1(stimuli / "age/old/of1.jpg") == "13a406d0d3a63c349a9def9ec92ddacce1ec3a02"
