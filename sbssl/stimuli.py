"""Stimulus images: discovery, decoding by content, sha256 identity, the manifest, and acquisition.

The stimuli root has the layout of the iEAT data set, ``<category>/<concept>/<image>``. A *concept* is the
folder holding an image, relative to the root (``valence/unpleasant``). Images are identified by the sha256
of their bytes, so a file that sits in several concept folders is embedded once.

What the scan reads (:func:`discover`, and with it :func:`build_manifest`, :func:`scan_fingerprint` and the
catalogue's folder check): the non-hidden files at least two folders deep that are *regular files inside the
root*. The root itself may be a symlink (it is resolved first). Below it:

- a symlink to a folder is never followed (wherever it leads; a tree with folder links would list images
  twice or leave the root);
- a symlink to a file is followed only when its target is a regular file inside the root; a symlink leading
  out of the root, to a missing file or to anything but a regular file is skipped;
- FIFOs, sockets and device files are skipped without being opened (reading a FIFO would block forever);
- skipped entries get no manifest row; one :class:`StimuliScanWarning` per scan names them.

Size limits, checked before anything is decoded: a file over :data:`MAX_IMAGE_BYTES` is not read, and an
image whose header states more than :data:`MAX_IMAGE_PIXELS` pixels is not decoded (:class:`ImageTooLarge`);
:func:`load_image` applies the same limits.

Manifest columns (one row per file, sorted by ``path``):

- ``path``: posix path relative to the root (``valence/unpleasant/coffin1_google.jpg``)
- ``concept``: the parent folder relative to the root (``valence/unpleasant``)
- ``sha256``: hex digest of the file bytes ("" for unreadable files)
- ``format``: ``JPEG`` / ``PNG`` / ``WEBP``, from the content, not the name ("" for unreadable files); a
  multi-picture JPEG (MPO, e.g. from a stereo or depth camera) is ``JPEG``
- ``width``, ``height``: pixels (0 for unreadable files)
- ``status``: ``;``-joined flags, ``ok`` when there is nothing to report, else any of ``duplicate`` (same
  bytes as a file earlier in path order), ``extension_mismatch`` (the name's extension does not match the
  content, e.g. a JPEG named ``.png``), ``animated`` (more than one frame: an animated PNG/WebP or a
  multi-picture JPEG; only the first frame is decoded and embedded), ``unreadable`` (only with ``skip_bad``;
  such rows are not usable), ``too_large`` (with ``unreadable``: the file is over :data:`MAX_IMAGE_BYTES`
  or the image over :data:`MAX_IMAGE_PIXELS`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
import tempfile
import warnings
from pathlib import Path, PurePosixPath
from typing import Iterable

import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

from sbssl.io import atomic_path, write_json_atomic

MANIFEST_COLUMNS = ("path", "concept", "sha256", "format", "width", "height", "status")
#: Formats decoded (Pillow format names) and the file extensions that agree with each.
FORMAT_EXTENSIONS = {
    "JPEG": (".jpg", ".jpeg", ".jpe", ".jfif"),
    "PNG": (".png",),
    "WEBP": (".webp",),
}
#: Largest stimulus file read, in bytes (64 MiB; the iEAT files are at most a few MB).
MAX_IMAGE_BYTES = 64 * 2**20
#: Largest image decoded, in pixels (width x height, 50 megapixels, ~150 MB as 8-bit RGB), checked from the
#: header before any pixel is decoded. Pillow's own limit only warns from 89 Mpx and refuses from 179 Mpx.
MAX_IMAGE_PIXELS = 50_000_000
#: The iEAT repository (Steed & Caliskan, FAccT 2021) at the commit the study used. Only the short id is
#: known here; GitHub resolves it in archive URLs. The archive itself is generated on the fly (not
#: byte-stable), so it is verified file by file against IEAT_FILE_HASHES instead of by its own sha256.
IEAT_COMMIT = "4d7639b"
IEAT_ARCHIVE_URL = f"https://github.com/ryansteed/ieat/archive/{IEAT_COMMIT}.tar.gz"
#: The per-file hashes of the iEAT ``data/experiments`` tree shipped with the package (see fetch_stimuli).
IEAT_FILE_HASHES = Path(__file__).resolve().parents[1] / "config" / "ieat_stimuli_files.csv"


class ImageTooLarge(ValueError):
    """A file over :data:`MAX_IMAGE_BYTES` or an image over :data:`MAX_IMAGE_PIXELS` (status ``too_large``)."""


class StimuliScanWarning(UserWarning):
    """Entries under a stimuli root that the scan skipped (symlinks leading out of the root, FIFOs, ...)."""


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def _skip_reason(base: Path, path: Path) -> str | None:
    """Why the scan skips the non-folder entry ``path`` under the resolved root ``base``; None for a candidate.

    Only metadata is read (lstat/stat), so a FIFO or device is never opened.
    """
    try:
        mode = os.lstat(path).st_mode
    except OSError as exc:
        return f"cannot be inspected ({exc.strerror})"
    if stat.S_ISREG(mode):
        return None
    if not stat.S_ISLNK(mode):
        return "not a regular file (FIFO, socket or device)"
    target = Path(os.path.realpath(path))
    if not target.is_relative_to(base):
        return f"symlink to {target}, outside the root"
    try:
        target_mode = os.stat(target).st_mode
    except OSError:
        return "dangling symlink"
    return None if stat.S_ISREG(target_mode) else f"symlink to {target}, not a regular file"


def _warn_skipped(base: Path, skipped: list[tuple[str, str]]) -> None:
    if skipped:
        listed = "; ".join(f"{rel}: {why}" for rel, why in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        entries = "entry" if len(skipped) == 1 else "entries"
        warnings.warn(
            f"stimuli root {base}: {len(skipped)} {entries} skipped ({listed}{more}); only regular files inside "
            "the root are stimuli: copy the images in to use them",
            StimuliScanWarning,
            stacklevel=3,
        )


def _scan_folder(
    base: Path, here: Path, dirnames: list[str], filenames: list[str], found: list[str],
    skipped: list[tuple[str, str]],
) -> list[str]:
    """Sort one folder's entries (as os.walk lists them) into ``found``/``skipped``; return the folders to enter.

    os.walk lists a folder symlink among the folders (and, with followlinks=False, never enters it).
    """
    rel_dir = here.relative_to(base)
    links = [d for d in dirnames if not d.startswith(".") and (here / d).is_symlink()]
    skipped.extend(((rel_dir / d).as_posix(), "folder symlink, not followed") for d in links)
    if len(rel_dir.parts) >= 2:  # files at the top or directly in a category folder are not stimuli
        for name in filenames:
            if name.startswith("."):
                continue
            rel = (rel_dir / name).as_posix()
            reason = _skip_reason(base, here / name)
            if reason is None:
                found.append(rel)
            else:
                skipped.append((rel, reason))
    return [d for d in dirnames if not d.startswith(".") and d not in links]


def _scan(base: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """(candidate paths, [(skipped path, reason)]) under the resolved root ``base``, both sorted by path."""
    found: list[str] = []
    skipped: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
        dirnames[:] = _scan_folder(base, Path(dirpath), dirnames, filenames, found, skipped)
    return sorted(found), sorted(skipped)


def _resolved_root(root: str | os.PathLike[str]) -> Path:
    if not Path(root).is_dir():
        raise FileNotFoundError(f"stimuli root {root} is not a directory")
    return Path(root).resolve()


def discover(root: str | os.PathLike[str]) -> list[str]:
    """Posix paths (relative to ``root``, sorted) of the candidate image files under ``root``.

    Candidates are the files at least two folders deep (``<category>/<concept>/<image>``); files at the top
    level or directly in a category folder (READMEs, licences) and hidden files/folders are not stimuli.
    Only regular files inside the root are candidates (see the module docstring: folder symlinks are not
    followed, file symlinks only to a regular file inside the root, FIFOs and devices are never opened);
    other entries are skipped with a :class:`StimuliScanWarning` naming them.
    """
    base = _resolved_root(root)
    found, skipped = _scan(base)
    _warn_skipped(base, skipped)
    return found


def concept_folder_files(root: str | os.PathLike[str], folder: str) -> list[str]:
    """Candidate image files (posix paths relative to ``root``, sorted) directly in the concept ``folder``.

    The same rules as :func:`discover`, for one folder (``folder`` is a relative posix path such as
    ``valence/pleasant``). Raises FileNotFoundError when the folder does not exist and ValueError when the
    scan would not read it: fewer than two levels deep, hidden, or a symlink (or below one), wherever it
    leads. An empty list means the folder holds no candidate file. Messages start with ``folder``.
    """
    base = _resolved_root(root)
    parts = PurePosixPath(folder).parts
    if len(parts) < 2 or any(p.startswith(".") for p in parts):
        raise ValueError(
            f"{folder!r} is not a concept folder the stimuli scan reads (it reads <category>/<concept>/<image>, "
            "no hidden folders); move the images or fix the path"
        )
    path = base.joinpath(*parts)
    if not path.is_dir():
        raise FileNotFoundError(f"{folder!r} not found under {base}; create it or fix the path")
    if path.resolve() != path:
        raise ValueError(
            f"{folder!r} under {base} is a symlink or lies below one (it leads to {path.resolve()}); the stimuli "
            "scan does not follow folder symlinks, so its images would be missing from the manifest: replace "
            "the link by a real folder holding the images"
        )
    found: list[str] = []
    skipped: list[tuple[str, str]] = []
    _, dirnames, filenames = next(os.walk(path), (None, [], []))  # an unlistable folder counts as empty
    _scan_folder(base, path, dirnames, filenames, found, skipped)
    _warn_skipped(base, sorted(skipped))
    return sorted(found)


def _read(file: Path) -> bytes:
    """The bytes of a regular file of at most :data:`MAX_IMAGE_BYTES`; anything else is a ValueError.

    A non-regular file (FIFO, device) is refused from its metadata without being opened; the descriptor is
    opened non-blocking and checked again, in case the file was swapped in between. An OS error (e.g.
    permissions) is a ValueError like a corrupt image; a file over the limit is :class:`ImageTooLarge`.
    """
    try:
        if not stat.S_ISREG(os.stat(file).st_mode):
            raise ValueError(f"{file}: not a regular file (FIFO, socket or device); remove it")
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ValueError(f"{file}: not a regular file (FIFO, socket or device); remove it")
            size = info.st_size
            if size <= MAX_IMAGE_BYTES:
                data = handle.read(MAX_IMAGE_BYTES + 1)  # +1: a file growing past the limit is caught too
                size = len(data)
    except OSError as exc:
        raise ValueError(f"{file}: cannot be read ({exc})") from exc
    if size > MAX_IMAGE_BYTES:
        raise ImageTooLarge(f"{file}: {size} bytes, over the limit MAX_IMAGE_BYTES = {MAX_IMAGE_BYTES}")
    return data


def _open_image(data: bytes, label: str) -> Image.Image:
    """Open image bytes (header only) in one of the study's formats; refuse over :data:`MAX_IMAGE_PIXELS`."""
    try:
        img = Image.open(io.BytesIO(data), formats=tuple(FORMAT_EXTENSIONS))
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{label}: over the limit MAX_IMAGE_PIXELS = {MAX_IMAGE_PIXELS} ({exc})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"{label}: not a readable JPEG/PNG/WebP image ({exc})") from exc
    if img.width * img.height > MAX_IMAGE_PIXELS:
        img.close()
        raise ImageTooLarge(
            f"{label}: {img.width}x{img.height} = {img.width * img.height} pixels, over the limit "
            f"MAX_IMAGE_PIXELS = {MAX_IMAGE_PIXELS}"
        )
    return img


def _decode(data: bytes, label: str) -> tuple[str, int, int, bool]:
    """Fully decode image bytes; return (format, width, height, animated) or raise ValueError naming ``label``.

    ``animated``: more than one frame (only the first is decoded). A multi-picture JPEG's format is ``JPEG``.
    """
    with _open_image(data, label) as img:
        try:
            img.load()  # decodes every pixel, so truncated or corrupt data fails here, not at embedding time
        except (OSError, SyntaxError, ValueError) as exc:
            raise ValueError(f"{label}: not a readable JPEG/PNG/WebP image ({exc})") from exc
        fmt = "JPEG" if img.format == "MPO" else str(img.format)
        return fmt, int(img.width), int(img.height), getattr(img, "n_frames", 1) > 1


def build_manifest(root: str | os.PathLike[str], skip_bad: bool = False) -> pd.DataFrame:
    """Scan ``root`` and return the manifest (columns :data:`MANIFEST_COLUMNS`, one row per file, by path).

    The files are those of :func:`discover`; every image is fully decoded. An unreadable file (corrupt, not a
    JPEG/PNG/WebP, over :data:`MAX_IMAGE_BYTES` or :data:`MAX_IMAGE_PIXELS`) raises ValueError naming it,
    unless ``skip_bad``, in which case its row has status ``unreadable`` (``unreadable;too_large`` for the
    size limits) and it is excluded from :func:`concept_images` and :func:`distinct_images`.
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
            fmt, width, height, animated = _decode(data, str(file))
        except ValueError as exc:
            if not skip_bad:
                hint = "remove or replace the file, or set skip_bad to skip unreadable images"
                raise type(exc)(f"{exc}; {hint}") from exc
            status = "unreadable;too_large" if isinstance(exc, ImageTooLarge) else "unreadable"
            rows.append((rel, concept, "", "", 0, 0, status))
            continue
        digest = hashlib.sha256(data).hexdigest()
        flags = []
        if digest in first_path:
            flags.append("duplicate")
        else:
            first_path[digest] = rel
        if PurePosixPath(rel).suffix.lower() not in FORMAT_EXTENSIONS[fmt]:
            flags.append("extension_mismatch")
        if animated:
            flags.append("animated")
        rows.append((rel, concept, digest, fmt, width, height, ";".join(flags) or "ok"))
    return pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS)).astype({"width": "int64", "height": "int64"})


_SCAN_CACHE_FORMAT = "sbssl-scan-cache-1"


def _load_scan_cache(path: Path) -> dict[str, list]:
    """The cache's entries, or {} when it is absent or not a cache of this format (it is rebuilt then)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if isinstance(data, dict) and data.get("format") == _SCAN_CACHE_FORMAT and isinstance(data.get("files"), dict):
        return data["files"]
    return {}


def scan_fingerprint(
    root: str | os.PathLike[str], cache_path: str | os.PathLike[str] | None = None
) -> str:
    """Hex sha256 of what the scan reads under ``root``: it changes exactly when image *content* changes.

    The digest is the sha256 of the sorted lines ``"<path>\\t<sha256 of its bytes>\\n"`` over the files of
    :func:`discover` (same rules: regular files inside the root). Adding, removing, renaming or editing a file
    changes it; touching one (new mtime, same bytes) does not. A file over :data:`MAX_IMAGE_BYTES` counts as
    ``too_large`` and one that cannot be read as ``unreadable`` instead of a hash: the manifest records them
    so whatever their bytes.

    ``cache_path`` (JSON, written atomically, only when an entry changed) keeps, per path, the file's stat
    signature ``[size, mtime_ns, ctime_ns, inode]`` and its sha256; a file whose signature is unchanged is not
    read again. ctime and inode are in the signature besides size and mtime because a copy that keeps
    timestamps (``cp -p``, ``rsync -t``, tar) can give a file another content with the old size and mtime,
    never with the old ctime. A cache that is missing, unreadable or of another format is rebuilt.

    Cost: a walk of the tree and one ``stat`` per file, plus reading and hashing every new or changed file
    (all of them without a cache or on the first call); the cache holds about 200 bytes per file.
    """
    base = Path(root)
    cache = Path(cache_path) if cache_path is not None else None
    old = _load_scan_cache(cache) if cache is not None else {}
    new: dict[str, list] = {}
    lines = []
    for rel in discover(base):
        file = base / rel
        try:
            info = os.stat(file)
        except OSError:
            lines.append(f"{rel}\tunreadable\n")
            continue
        signature = [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino]
        cached = old.get(rel)
        if info.st_size > MAX_IMAGE_BYTES:
            value = "too_large"
        elif isinstance(cached, list) and len(cached) == 5 and cached[:4] == signature and isinstance(cached[4], str):
            new[rel] = cached
            value = cached[4]
        else:
            try:
                value = hashlib.sha256(_read(file)).hexdigest()
                new[rel] = [*signature, value]
            except ImageTooLarge:
                value = "too_large"
            except ValueError:
                value = "unreadable"
        lines.append(f"{rel}\t{value}\n")
    if cache is not None and new != old:
        write_json_atomic(cache, {"format": _SCAN_CACHE_FORMAT, "files": new})
    return hashlib.sha256("".join(sorted(lines)).encode("utf-8")).hexdigest()


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
    colour under transparent pixels is kept, not composited onto a background). An animated image gives its
    first frame.

    The scan's limits apply: only a regular file of at most :data:`MAX_IMAGE_BYTES` is read and only an
    image of at most :data:`MAX_IMAGE_PIXELS` is decoded (:class:`ImageTooLarge`, a ValueError, otherwise).
    Raises ValueError naming the file for anything unreadable.
    """
    file = Path(path)
    with _open_image(_read(file), str(file)) as img:
        try:
            img.load()
            img = ImageOps.exif_transpose(img)
        except (OSError, SyntaxError, ValueError) as exc:
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
