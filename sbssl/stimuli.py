"""Stimulus images: discovery, decoding by content, sha256 identity, the manifest, and acquisition.

The stimuli root has the layout of the iEAT data set, ``<category>/<concept>/<image>``. A *concept* is the
folder holding an image, relative to the root (``valence/unpleasant``). Images are identified by the sha256
of their bytes, so a file that sits in several concept folders is embedded once.

Manifest columns (one row per file, sorted by ``path``):

- ``path``: posix path relative to the root (``valence/unpleasant/coffin1_google.jpg``)
- ``concept``: the parent folder relative to the root (``valence/unpleasant``)
- ``sha256``: hex digest of the file bytes ("" for unreadable files)
- ``format``: ``JPEG`` / ``PNG`` / ``WEBP``, from the content, not the name ("" for unreadable files)
- ``width``, ``height``: pixels (0 for unreadable files)
- ``status``: ``;``-joined flags, ``ok`` when there is nothing to report, else any of ``duplicate`` (same
  bytes as a file earlier in path order), ``extension_mismatch`` (the name's extension does not match the
  content, e.g. a JPEG named ``.png``), ``unreadable`` (only with ``skip_bad``; such rows are not usable).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Iterable

import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

from sbssl.io import atomic_path

MANIFEST_COLUMNS = ("path", "concept", "sha256", "format", "width", "height", "status")
#: Formats decoded (Pillow format names) and the file extensions that agree with each.
FORMAT_EXTENSIONS = {
    "JPEG": (".jpg", ".jpeg", ".jpe", ".jfif"),
    "PNG": (".png",),
    "WEBP": (".webp",),
}
#: The iEAT repository (Steed & Caliskan, FAccT 2021) at the commit the study used. Only the short id is
#: known here; GitHub resolves it in archive URLs. The archive itself is generated on the fly (not
#: byte-stable), so it is verified file by file against IEAT_FILE_HASHES instead of by its own sha256.
IEAT_COMMIT = "4d7639b"
IEAT_ARCHIVE_URL = f"https://github.com/ryansteed/ieat/archive/{IEAT_COMMIT}.tar.gz"
#: The per-file hashes of the iEAT ``data/experiments`` tree shipped with the package (see fetch_stimuli).
IEAT_FILE_HASHES = Path(__file__).resolve().parents[1] / "config" / "ieat_stimuli_files.csv"


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def discover(root: str | os.PathLike[str]) -> list[str]:
    """Posix paths (relative to ``root``, sorted) of the candidate image files under ``root``.

    Candidates are the files at least two folders deep (``<category>/<concept>/<image>``); files at the top
    level or directly in a category folder (READMEs, licences) and hidden files/folders are not stimuli.
    """
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"stimuli root {base} is not a directory")
    found = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(base)
        if len(rel_dir.parts) < 2:
            continue
        found.extend((rel_dir / name).as_posix() for name in filenames if not name.startswith("."))
    return sorted(found)


def _read(file: Path) -> bytes:
    """The file's bytes; an OS error (e.g. permissions) is a ValueError like a corrupt image."""
    try:
        return file.read_bytes()
    except OSError as exc:
        raise ValueError(f"{file}: cannot be read ({exc}); fix the file or set skip_bad") from exc


def _decode(data: bytes, label: str) -> tuple[str, int, int]:
    """Fully decode image bytes; return (format, width, height) or raise ValueError naming ``label``."""
    try:
        with Image.open(io.BytesIO(data), formats=tuple(FORMAT_EXTENSIONS)) as img:
            img.load()  # decodes every pixel, so truncated or corrupt data fails here, not at embedding time
            return str(img.format), int(img.width), int(img.height)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(
            f"{label}: not a readable JPEG/PNG/WebP image ({exc}); remove or replace the file, "
            "or set skip_bad to skip unreadable images"
        ) from exc


def build_manifest(root: str | os.PathLike[str], skip_bad: bool = False) -> pd.DataFrame:
    """Scan ``root`` and return the manifest (columns :data:`MANIFEST_COLUMNS`, one row per file, by path).

    Every image is fully decoded. An unreadable file raises ValueError naming it, unless ``skip_bad``, in which
    case its row has status ``unreadable`` and it is excluded from :func:`concept_images` and
    :func:`distinct_images`.
    """
    base = Path(root)
    rows = []
    first_path: dict[str, str] = {}
    paths = discover(base)
    if not paths:
        raise ValueError(f"no images found under {base}; expected <category>/<concept>/<image> files")
    for rel in paths:
        file = base / rel
        concept = PurePosixPath(rel).parent.as_posix()
        try:
            data = _read(file)
            fmt, width, height = _decode(data, str(file))
        except ValueError:
            if not skip_bad:
                raise
            rows.append((rel, concept, "", "", 0, 0, "unreadable"))
            continue
        digest = hashlib.sha256(data).hexdigest()
        flags = []
        if digest in first_path:
            flags.append("duplicate")
        else:
            first_path[digest] = rel
        if PurePosixPath(rel).suffix.lower() not in FORMAT_EXTENSIONS[fmt]:
            flags.append("extension_mismatch")
        rows.append((rel, concept, digest, fmt, width, height, ";".join(flags) or "ok"))
    return pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS)).astype({"width": "int64", "height": "int64"})


def _check_columns(df: pd.DataFrame, label: str) -> None:
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(
            f"{label}: not a stimuli manifest, missing column(s) {missing}; expected {list(MANIFEST_COLUMNS)} "
            "(rebuild it with `sbssl manifest`)"
        )


def write_manifest(df: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write the manifest as CSV atomically (columns in :data:`MANIFEST_COLUMNS` order)."""
    _check_columns(df, "manifest to write")
    with atomic_path(path) as tmp:
        df.loc[:, list(MANIFEST_COLUMNS)].to_csv(tmp, index=False)


def read_manifest(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a manifest written by :func:`write_manifest`, validating its columns and types."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"stimuli manifest {file} not found (build it with `sbssl manifest`)")
    # keep_default_na=False: the empty sha256/format of unreadable rows must stay "" and not become NaN.
    df = pd.read_csv(file, dtype=str, keep_default_na=False)
    _check_columns(df, str(file))
    try:
        df = df.astype({"width": "int64", "height": "int64"})
    except ValueError as exc:
        raise ValueError(f"{file}: width/height must be integers ({exc})") from exc
    return df.loc[:, list(MANIFEST_COLUMNS)]


def _usable(manifest: pd.DataFrame) -> pd.DataFrame:
    return manifest[~manifest["status"].str.contains("unreadable", regex=False)]


def concept_images(manifest: pd.DataFrame, concept: str) -> list[str]:
    """sha256 of the usable files in folder ``concept``, in path order, one entry per file.

    Identical files in one folder appear once per file, as in the reference iEAT code.
    Raises ValueError when the folder has no usable image.
    """
    rows = manifest[manifest["concept"] == concept]
    if rows.empty:
        raise ValueError(f"concept folder {concept!r} is not in the stimuli manifest (check the catalogue paths)")
    usable = _usable(rows).sort_values("path")
    if usable.empty:
        raise ValueError(f"concept folder {concept!r} has no readable image (all {len(rows)} are unreadable)")
    return usable["sha256"].tolist()


def distinct_images(manifest: pd.DataFrame) -> pd.DataFrame:
    """One row per usable sha256 (its first file in path order): what gets embedded.

    Columns: sha256, path, format, width, height; rows in path order of the first file.
    """
    usable = _usable(manifest).sort_values("path")
    first = usable.drop_duplicates("sha256", keep="first")
    return first.loc[:, ["sha256", "path", "format", "width", "height"]].reset_index(drop=True)


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Decode a JPEG/PNG/WebP file (by content) into an 8-bit RGB image, as the reference pipeline saw it.

    The iEAT reference code read images with OpenCV's ``imread`` (colour mode), and torchvision's loader uses
    ``convert("RGB")``; both apply the same conventions, kept here so embeddings match the published setup:
    EXIF orientation is applied, palettes are expanded, greyscale is replicated to three channels, CMYK is
    converted, 16-bit/32-bit greyscale is scaled to 8 bits, and an alpha channel is dropped (the stored
    colour under transparent pixels is kept, not composited onto a background).
    """
    file = Path(path)
    try:
        with Image.open(file, formats=tuple(FORMAT_EXTENSIONS)) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{file}: not a readable JPEG/PNG/WebP image ({exc})") from exc
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # convert("RGB") would clip 16-bit values at 255; scale the integer range to 8 bits instead.
        scale = 1 / 256 if img.mode.startswith("I;16") else 1 / 16777216
        img = img.point(lambda v: v * scale).convert("L")
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")  # palette -> true colour first, so transparency info is resolved
    return img.convert("RGB")


def _safe_member_path(name: str, subdir: str) -> str | None:
    """Path of a tar member relative to ``subdir`` inside the archive's single top folder, or None.

    Code-host archives wrap the tree in one top folder (``ieat-<commit>/``). Members outside
    ``<top>/<subdir>/`` are not wanted; absolute paths and ``..`` components are refused.
    """
    parts = PurePosixPath(name).parts
    if not parts or PurePosixPath(name).is_absolute() or ".." in parts:
        raise ValueError(f"archive member {name!r} has an unsafe path; refusing to extract the archive")
    want = PurePosixPath(subdir).parts
    if tuple(parts[1 : 1 + len(want)]) != want or len(parts) <= 1 + len(want):
        return None
    return PurePosixPath(*parts[1 + len(want) :]).as_posix()


def git_blob_sha1(path: str | os.PathLike[str]) -> str:
    """Git's object id of a file (sha1 of ``b"blob <size>\\0"`` + bytes), as ``git hash-object`` prints it."""
    data = Path(path).read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def read_file_hashes(path: str | os.PathLike[str] = IEAT_FILE_HASHES) -> dict[str, str]:
    """The expected files of a stimuli tree, ``{relative posix path: digest}``, from a CSV.

    Columns: path, sha256 and optionally git_blob_sha1. The digest is the sha256; where it is empty, the git
    blob id written as ``git:<sha1>`` (the iEAT file missing from the shared copy has only that).
    """
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if not {"path", "sha256"} <= set(table.columns):
        raise ValueError(f"{path}: expected columns path and sha256, found {list(table.columns)}")
    git = table["git_blob_sha1"] if "git_blob_sha1" in table.columns else pd.Series("", index=table.index)
    return {
        rel: sha or (f"git:{blob}" if blob else "")
        for rel, sha, blob in zip(table["path"], table["sha256"], git)
    }


def fetch_stimuli(
    dest: str | os.PathLike[str],
    *,
    url: str = IEAT_ARCHIVE_URL,
    archive_sha256: str | None = None,
    subdir: str = "data/experiments",
    file_hashes: str | os.PathLike[str] | dict[str, str] | None = IEAT_FILE_HASHES,
    retries: int = 3,
    timeout: float = 60,
    progress: bool = True,
) -> Path:
    """Download a repository archive (tar.gz) and install its ``subdir`` tree as the stimuli root ``dest``.

    The archive goes to a temporary file beside ``dest`` (via :func:`sbssl.download.download`, so
    ``archive_sha256`` is checked when given). Only regular files under ``<top folder>/<subdir>/`` are
    extracted, into a temporary folder that is renamed to ``dest`` once complete; unsafe member paths
    (absolute, ``..``) and links are refused. Archives generated by code hosts are not byte-stable, so the
    extracted files are verified one by one against ``file_hashes`` (``{path: digest}`` or a CSV read by
    :func:`read_file_hashes`; an empty digest = not checked): a file with a different digest is an error, a
    listed file absent from the archive is an error, files not listed are kept. ``None`` skips the check.
    An existing ``dest`` is an error (delete it to fetch again). Returns ``dest``.
    """
    from sbssl.download import download

    target = Path(dest)
    if target.exists():
        raise FileExistsError(f"{target} already exists; delete it to fetch the stimuli again")
    target.parent.mkdir(parents=True, exist_ok=True)
    expected = read_file_hashes(file_hashes) if isinstance(file_hashes, (str, os.PathLike)) else file_hashes
    workdir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        archive = download(
            url, workdir / "archive.tar.gz", sha256=archive_sha256, retries=retries, timeout=timeout,
            progress=progress,
        )
        tree = workdir / "tree"
        tree.mkdir()
        extracted = _extract_subdir(archive, tree, subdir, url)
        if not extracted:
            raise ValueError(f"{url}: the archive has no files under <top folder>/{subdir}/")
        if expected is not None:
            _verify_tree(tree, extracted, expected, url)
        os.replace(tree, target)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return target


def _extract_subdir(archive: Path, tree: Path, subdir: str, url: str) -> list[str]:
    """Extract regular files below ``subdir`` into ``tree``; return their relative posix paths."""
    extracted = []
    with tarfile.open(archive, mode="r:*") as tar:
        for member in tar:
            rel = _safe_member_path(member.name, subdir)
            if rel is None or member.isdir():
                continue
            if not member.isfile():
                raise ValueError(f"{url}: archive member {member.name!r} is a link or special file; refusing it")
            out = tree / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None  # regular files always have a payload
            with source, open(out, "wb") as sink:
                shutil.copyfileobj(source, sink)
            extracted.append(rel)
    return extracted


def _file_digest(path: Path, expected: str) -> str:
    """The digest of ``path`` in the same form as ``expected`` (sha256 hex, or ``git:<blob sha1>``)."""
    return f"git:{git_blob_sha1(path)}" if expected.startswith("git:") else sha256_file(path)


def _verify_tree(tree: Path, extracted: Iterable[str], expected: dict[str, str], url: str) -> None:
    present = set(extracted)
    bad = [
        f"{rel} (expected {want}, got {got})"
        for rel, want in sorted(expected.items())
        if want and rel in present and (got := _file_digest(tree / rel, want)) != want
    ]
    absent = sorted(set(expected) - present)
    if bad or absent:
        raise ValueError(
            f"stimuli from {url} do not match the pinned file hashes: {len(bad)} differ"
            f"{': ' + '; '.join(bad[:5]) if bad else ''}, {len(absent)} missing"
            f"{': ' + ', '.join(absent[:5]) if absent else ''}"
        )
