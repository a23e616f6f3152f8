from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFile

from sbssl import stimuli as stim
from sbssl.stimuli import (
    MANIFEST_COLUMNS,
    MAX_IMAGE_PIXELS,
    ImageTooLarge,
    StimuliScanWarning,
    build_manifest,
    concept_images,
    discover,
    distinct_images,
    load_image,
    read_manifest,
    scan_fingerprint,
    write_manifest,
)


@pytest.fixture(scope="module")
def stimuli(shared_dir: Path) -> Path:
    return shared_dir / "ieat" / "stimuli"


@pytest.fixture(scope="module")
def full_manifest(stimuli: Path) -> pd.DataFrame:
    return build_manifest(stimuli)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _row(manifest: pd.DataFrame, path: str) -> pd.Series:
    rows = manifest[manifest["path"] == path]
    assert len(rows) == 1, path
    return rows.iloc[0]


# --- the real iEAT stimuli -----------------------------------------------------------------------------


def test_full_tree_counts(full_manifest: pd.DataFrame) -> None:
    # The shared copy lacks gender/career/professional2_google.jpg: 870 - 1 files, 665 - 1 distinct images.
    assert list(full_manifest.columns) == list(MANIFEST_COLUMNS)
    assert len(full_manifest) == 869
    assert len(distinct_images(full_manifest)) == 664
    assert full_manifest["format"].value_counts().to_dict() == {"JPEG": 807, "PNG": 33, "WEBP": 29}
    assert full_manifest["concept"].nunique() == 60
    assert full_manifest["path"].is_monotonic_increasing
    assert "README.md" not in set(full_manifest["path"])  # top-level files are not stimuli
    flags = full_manifest["status"].str.split(";").explode().value_counts().to_dict()
    assert flags == {"ok": 663, "duplicate": 205, "extension_mismatch": 1}


def test_png_named_jpeg_is_decoded_by_content(full_manifest: pd.DataFrame, stimuli: Path) -> None:
    row = _row(full_manifest, "valence/unpleasant/corpse3_google.png")
    assert (row["format"], row["width"], row["height"]) == ("JPEG", 300, 200)
    assert row["status"] == "extension_mismatch"
    img = load_image(stimuli / row["path"])
    assert (img.mode, img.size) == ("RGB", (300, 200))


def test_identical_coffins_count_twice_in_their_folder_and_embed_once(full_manifest: pd.DataFrame) -> None:
    coffin1 = _row(full_manifest, "valence/unpleasant/coffin1_google.jpg")
    coffin4 = _row(full_manifest, "valence/unpleasant/coffin4_google.jpg")
    assert coffin1["sha256"] == coffin4["sha256"]
    assert coffin4["status"] == "duplicate"
    shas = concept_images(full_manifest, "valence/unpleasant")
    assert len(shas) == 55  # every file of the folder
    assert shas.count(coffin1["sha256"]) == 2
    distinct = distinct_images(full_manifest)
    assert (distinct["sha256"] == coffin1["sha256"]).sum() == 1
    # the first file in path order is the one embedded (valence/unpleasant-1 sorts before valence/unpleasant/)
    assert distinct.set_index("sha256").loc[coffin1["sha256"], "path"] == "valence/unpleasant-1/coffin1_google.jpg"


def test_image_shared_between_target_and_attribute_folders(full_manifest: pd.DataFrame) -> None:
    insect = _row(full_manifest, "insect-flower/insect/roach2_google.jpg")
    unpleasant = _row(full_manifest, "valence/unpleasant/roach2_google.jpg")
    assert insect["sha256"] == unpleasant["sha256"]
    assert insect["sha256"] in concept_images(full_manifest, "insect-flower/insect")
    assert insect["sha256"] in concept_images(full_manifest, "valence/unpleasant")


def test_webp_files(full_manifest: pd.DataFrame, stimuli: Path) -> None:
    webp = full_manifest[full_manifest["format"] == "WEBP"]
    assert len(webp) == 29
    assert webp["path"].str.endswith(".webp").all()
    row = _row(full_manifest, "valence/unpleasant/corpse4_google.webp")
    assert (row["width"], row["height"], row["sha256"]) == (940, 529, _sha(stimuli / row["path"]))
    img = load_image(stimuli / row["path"])
    assert (img.mode, img.size) == ("RGB", (940, 529))


def test_real_rgba_palette_greyscale_and_cmyk_load_as_rgb(stimuli: Path) -> None:
    cases = {
        "intersectional/black-male/bm11.png": "RGBA",
        "religion/christianity/christianity1_google.png": "P",
        "presidents/lincoln/lincolnp1.jpg": "L",
        "insect-flower/insect/roach4_google.jpg": "CMYK",
    }
    for rel, mode in cases.items():
        with Image.open(stimuli / rel) as raw:
            assert raw.mode == mode
            size = raw.size
        img = load_image(stimuli / rel)
        assert (img.mode, img.size) == ("RGB", size), rel
    grey = np.asarray(load_image(stimuli / "presidents/lincoln/lincolnp1.jpg"))
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()


def test_manifest_round_trip(full_manifest: pd.DataFrame, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "manifest.csv"
    write_manifest(full_manifest, out)
    back = read_manifest(out)
    pd.testing.assert_frame_equal(back, full_manifest)
    assert [p.name for p in out.parent.iterdir()] == ["manifest.csv"]  # no temp file left behind


# --- generated images ------------------------------------------------------------------------------------


def _save(path: Path, img: Image.Image, fmt: str, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **kwargs)
    return path


@pytest.fixture()
def small_tree(tmp_path: Path) -> Path:
    root = tmp_path / "stimuli"
    rgb = Image.new("RGB", (8, 6), (200, 30, 10))
    _save(root / "cat" / "a" / "one.jpg", rgb, "JPEG")
    _save(root / "cat" / "a" / "two.png", Image.new("RGB", (5, 5), (1, 2, 3)), "PNG")
    _save(root / "cat" / "b" / "three.webp", Image.new("RGB", (4, 7), (9, 9, 9)), "WEBP")
    shutil.copy(root / "cat" / "a" / "one.jpg", root / "cat" / "b" / "one_copy.jpeg")
    (root / "README.md").write_text("not a stimulus")
    (root / "cat" / "notes.txt").write_text("not a stimulus either")
    (root / "cat" / "a" / ".DS_Store").write_bytes(b"\0\0")
    return root


def test_discover_skips_top_level_and_hidden_files(small_tree: Path) -> None:
    assert discover(small_tree) == ["cat/a/one.jpg", "cat/a/two.png", "cat/b/one_copy.jpeg", "cat/b/three.webp"]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        discover(small_tree / "nowhere")


def test_generated_tree_manifest(small_tree: Path) -> None:
    m = build_manifest(small_tree)
    assert m["path"].tolist() == discover(small_tree)
    assert m["concept"].tolist() == ["cat/a", "cat/a", "cat/b", "cat/b"]
    assert m["format"].tolist() == ["JPEG", "PNG", "JPEG", "WEBP"]
    assert m["status"].tolist() == ["ok", "ok", "duplicate", "ok"]
    assert (m["width"].tolist(), m["height"].tolist()) == ([8, 5, 8, 4], [6, 5, 6, 7])
    assert m.loc[0, "sha256"] == _sha(small_tree / "cat/a/one.jpg") == m.loc[2, "sha256"]
    assert concept_images(m, "cat/b") == [m.loc[2, "sha256"], m.loc[3, "sha256"]]
    assert distinct_images(m)["path"].tolist() == ["cat/a/one.jpg", "cat/a/two.png", "cat/b/three.webp"]
    with pytest.raises(ValueError, match="cat/zzz"):
        concept_images(m, "cat/zzz")


def test_corrupt_image_is_an_error_naming_the_file(small_tree: Path) -> None:
    good = (small_tree / "cat/a/one.jpg").read_bytes()
    bad = small_tree / "cat" / "b" / "truncated.jpg"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"truncated\.jpg.*skip_bad"):
        build_manifest(small_tree)
    with pytest.raises(ValueError, match=r"truncated\.jpg"):
        load_image(bad)


@pytest.mark.parametrize(
    "name, payload",
    [
        ("text.jpg", b"this is not an image"),
        ("anim.gif", None),  # a valid image in a format the study does not decode
    ],
)
def test_unreadable_files_with_and_without_skip_bad(small_tree: Path, name: str, payload: bytes | None) -> None:
    path = small_tree / "cat" / "b" / name
    if payload is None:
        _save(path, Image.new("P", (3, 3)), "GIF")
    else:
        path.write_bytes(payload)
    with pytest.raises(ValueError, match=name):
        build_manifest(small_tree)
    m = build_manifest(small_tree, skip_bad=True)
    row = _row(m, f"cat/b/{name}")
    assert (row["status"], row["sha256"], row["format"], row["width"]) == ("unreadable", "", "", 0)
    assert len(concept_images(m, "cat/b")) == 2
    assert len(distinct_images(m)) == 3
    # the empty sha256 of the unreadable row survives a CSV round trip as "", not NaN
    write_manifest(m, small_tree.parent / "m.csv")
    assert _row(read_manifest(small_tree.parent / "m.csv"), f"cat/b/{name}")["sha256"] == ""


def test_folder_with_only_unreadable_images(tmp_path: Path) -> None:
    (tmp_path / "c" / "d").mkdir(parents=True)
    (tmp_path / "c" / "d" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    m = build_manifest(tmp_path, skip_bad=True)
    with pytest.raises(ValueError, match="no readable image"):
        concept_images(m, "c/d")
    with pytest.raises(ValueError, match="no images found"):
        build_manifest(tmp_path / "c")


def test_read_manifest_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.csv"):
        read_manifest(tmp_path / "absent.csv")
    broken = tmp_path / "broken.csv"
    broken.write_text("path,concept,sha256\na/b/c.jpg,a/b,00\n")
    with pytest.raises(ValueError, match=r"broken\.csv.*\['format', 'width', 'height', 'status'\]"):
        read_manifest(broken)
    with pytest.raises(ValueError, match="missing column"):
        write_manifest(pd.DataFrame({"path": ["x"]}), tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()


def test_load_image_greyscale_alpha_palette_16bit(tmp_path: Path) -> None:
    grey = _save(tmp_path / "g.png", Image.new("L", (2, 2), 77), "PNG")
    assert np.asarray(load_image(grey)).tolist() == [[[77, 77, 77]] * 2] * 2

    rgba = Image.new("RGBA", (2, 1), (10, 20, 30, 0))
    rgba.putpixel((1, 0), (40, 50, 60, 255))
    # alpha is dropped, keeping the stored colour (what OpenCV's imread and torchvision's loader give)
    assert np.asarray(load_image(_save(tmp_path / "a.png", rgba, "PNG"))).tolist() == [[[10, 20, 30], [40, 50, 60]]]

    grey_alpha = Image.new("LA", (1, 1), (90, 0))
    assert np.asarray(load_image(_save(tmp_path / "la.png", grey_alpha, "PNG"))).tolist() == [[[90, 90, 90]]]

    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 0), 1)
    pal = _save(tmp_path / "p.png", palette, "PNG", transparency=0)
    assert np.asarray(load_image(pal)).tolist() == [[[255, 0, 0], [0, 0, 255]]]

    deep = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    assert deep.mode.startswith("I;16")
    values = np.asarray(load_image(_save(tmp_path / "d.png", deep, "PNG")))[0, :, 0].tolist()
    assert values == [0, 128, 255]  # scaled, not clipped at 255


def test_load_image_applies_exif_orientation(tmp_path: Path) -> None:
    img = Image.new("RGB", (4, 2), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90 degrees
    path = _save(tmp_path / "rot.jpg", img, "JPEG", exif=exif.tobytes())
    assert load_image(path).size == (2, 4)


def test_manifest_command(small_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sbssl.cli import main

    out = tmp_path / "results" / "manifest.csv"
    assert main(["manifest", "--stimuli", str(small_tree), "--out", str(out)]) == 0
    pd.testing.assert_frame_equal(read_manifest(out), build_manifest(small_tree))
    assert "4 files, 3 distinct images" in capsys.readouterr().out
    (small_tree / "cat" / "a" / "bad.jpg").write_bytes(b"junk")
    assert main(["manifest", "--stimuli", str(small_tree), "--out", str(out)]) == 2
    assert "bad.jpg" in capsys.readouterr().err
    assert main(["manifest", "--stimuli", str(small_tree), "--out", str(out), "--skip-bad"]) == 0
    assert _row(read_manifest(out), "cat/a/bad.jpg")["status"] == "unreadable"


def test_file_that_cannot_be_opened(small_tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An OS error while reading (e.g. permissions; the tests may run as root, so it is simulated) is unreadable.
    real_open = os.open

    def refuse(path, *args, **kwargs):
        if str(path).endswith("two.png"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(stim.os, "open", refuse)
    with pytest.raises(ValueError, match=r"two\.png: cannot be read .*Permission denied.*skip_bad"):
        build_manifest(small_tree)
    assert _row(build_manifest(small_tree, skip_bad=True), "cat/a/two.png")["status"] == "unreadable"


# --- what the scan reads: regular files inside the root ----------------------------------------------------


@pytest.mark.timeout(30)  # reading the FIFO or /dev/zero would block or never end
def test_scan_skips_links_out_of_the_root_and_special_files(small_tree: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    _save(outside / "secret.jpg", Image.new("RGB", (3, 3), (5, 5, 5)), "JPEG")
    a, b = small_tree / "cat" / "a", small_tree / "cat" / "b"
    (a / "out.jpg").symlink_to(outside / "secret.jpg")  # file link leaving the root
    (a / "zero.jpg").symlink_to("/dev/zero")  # device
    os.mkfifo(a / "pipe.jpg")
    (b / "to_pipe.jpg").symlink_to("../a/pipe.jpg")  # inside the root, but not a regular file
    (a / "dangling.jpg").symlink_to(small_tree / "gone.jpg")
    (b / "link.jpg").symlink_to("../a/one.jpg")  # inside the root, regular: followed
    (small_tree / "cat" / "ext").symlink_to(outside, target_is_directory=True)  # folder link leaving the root
    (small_tree / "cat" / "again").symlink_to(a, target_is_directory=True)  # folder link inside: not followed
    expected = ["cat/a/one.jpg", "cat/a/two.png", "cat/b/link.jpg", "cat/b/one_copy.jpeg", "cat/b/three.webp"]
    with pytest.warns(StimuliScanWarning, match=r"7 entries skipped \(cat/a/dangling\.jpg: dangling symlink;") as w:
        assert discover(small_tree) == expected
    message = str(w[0].message)
    assert f"cat/a/out.jpg: symlink to {outside.resolve() / 'secret.jpg'}, outside the root" in message
    assert "cat/a/pipe.jpg: not a regular file" in message and "and 2 more" in message
    with pytest.warns(StimuliScanWarning):
        m = build_manifest(small_tree, skip_bad=True)
    assert m["path"].tolist() == expected  # nothing recorded for the skipped entries
    link = _row(m, "cat/b/link.jpg")
    assert (link["sha256"], link["status"]) == (_sha(a / "one.jpg"), "duplicate")
    # the reader itself never opens a FIFO or a device, whoever names it
    for special in (a / "pipe.jpg", a / "zero.jpg"):
        with pytest.raises(ValueError, match=rf"{special.name}: not a regular file"):
            load_image(special)


def test_root_given_through_a_symlink(small_tree: Path, tmp_path: Path) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(small_tree, target_is_directory=True)
    assert discover(alias) == discover(small_tree)
    pd.testing.assert_frame_equal(build_manifest(alias), build_manifest(small_tree))


def test_file_over_the_byte_limit(small_tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = small_tree / "cat" / "b" / "big.png"
    big.write_bytes((small_tree / "cat/a/two.png").read_bytes() + b"\0" * 4096)  # trailing bytes: still a PNG
    size = big.stat().st_size
    monkeypatch.setattr(stim, "MAX_IMAGE_BYTES", size - 1)
    assert max((small_tree / p).stat().st_size for p in discover(small_tree) if p != "cat/b/big.png") < size - 1
    with pytest.raises(ImageTooLarge, match=rf"big\.png: {size} bytes, over the limit MAX_IMAGE_BYTES = {size - 1}"):
        build_manifest(small_tree)
    assert _row(build_manifest(small_tree, skip_bad=True), "cat/b/big.png")["status"] == "unreadable;too_large"
    with pytest.raises(ImageTooLarge, match="MAX_IMAGE_BYTES"):
        load_image(big)
    monkeypatch.setattr(stim, "MAX_IMAGE_BYTES", size)
    assert _row(build_manifest(small_tree), "cat/b/big.png")["status"] == "ok"


def _bilevel_png(path: Path, width: int, height: int) -> Path:
    """A real, valid 1-bit PNG of blank rows, written without holding the pixels in memory (a few KB)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns from 89 Mpx
def test_image_over_the_pixel_limit_is_refused_from_its_header(
    small_tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = _bilevel_png(small_tree / "cat" / "b" / "huge.png", 12000, 12000)
    assert big.stat().st_size < 100_000
    # refused before any pixel is decoded: decoding would fail with another message
    real_load = ImageFile.ImageFile.load

    def load(self):  # the small images of the tree decode as usual
        return pytest.fail("pixels of the huge image decoded") if self.width == 12000 else real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    limit = rf"12000x12000 = 144000000 pixels, over the limit MAX_IMAGE_PIXELS = {MAX_IMAGE_PIXELS}"
    with pytest.raises(ImageTooLarge, match=rf"huge\.png: {limit}; remove or replace the file, or set skip_bad"):
        build_manifest(small_tree)
    with pytest.raises(ImageTooLarge, match=rf"huge\.png: {limit}"):
        load_image(big)
    monkeypatch.undo()
    row = _row(build_manifest(small_tree, skip_bad=True), "cat/b/huge.png")
    assert (row["status"], row["sha256"], row["width"]) == ("unreadable;too_large", "", 0)
    assert MAX_IMAGE_PIXELS == 50_000_000


def test_pixel_limit_boundary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stim, "MAX_IMAGE_PIXELS", 20)
    at_limit = _save(tmp_path / "c" / "d" / "at.png", Image.new("RGB", (4, 5)), "PNG")
    over = _save(tmp_path / "c" / "d" / "over.png", Image.new("RGB", (3, 7)), "PNG")
    assert load_image(at_limit).size == (4, 5)
    with pytest.raises(ImageTooLarge, match="3x7 = 21 pixels, over the limit MAX_IMAGE_PIXELS = 20"):
        load_image(over)
    m = build_manifest(tmp_path, skip_bad=True)
    assert m["status"].tolist() == ["ok", "unreadable;too_large"]


def test_animated_images_are_flagged_and_give_their_first_frame(tmp_path: Path) -> None:
    first, second = Image.new("RGB", (4, 3), (200, 10, 10)), Image.new("RGB", (4, 3), (10, 10, 200))
    files = {
        "anim.png": ("PNG", "PNG"),  # APNG
        "anim.webp": ("WEBP", "WEBP"),
        "multi.jpg": ("MPO", "JPEG"),  # multi-picture JPEG (stereo/depth cameras): a JPEG by content
    }
    for name, (writer, _) in files.items():
        _save(tmp_path / "c" / "d" / name, first, writer, save_all=True, append_images=[second], quality=95)
    _save(tmp_path / "c" / "d" / "still.png", first, "PNG")
    m = build_manifest(tmp_path)
    assert m["path"].tolist() == ["c/d/anim.png", "c/d/anim.webp", "c/d/multi.jpg", "c/d/still.png"]
    assert m["format"].tolist() == ["PNG", "WEBP", "JPEG", "PNG"]
    assert m["status"].tolist() == ["animated", "animated", "animated", "ok"]
    assert (m["width"].tolist(), m["height"].tolist()) == ([4] * 4, [3] * 4)
    for name in files:
        pixel = np.asarray(load_image(tmp_path / "c" / "d" / name))[1, 1].astype(int)
        assert np.abs(pixel - [200, 10, 10]).max() <= 8, name  # the first frame (lossy formats: nearly)


# --- scan_fingerprint ------------------------------------------------------------------------------------------


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    reads: list[str] = []
    real_read = stim._read

    def counting(file: Path) -> bytes:
        reads.append(Path(file).name)
        return real_read(file)

    monkeypatch.setattr(stim, "_read", counting)
    return reads


def test_scan_fingerprint_is_the_digest_of_paths_and_contents(small_tree: Path) -> None:
    lines = sorted(f"{rel}\t{_sha(small_tree / rel)}\n" for rel in discover(small_tree))
    expected = hashlib.sha256("".join(lines).encode()).hexdigest()
    assert scan_fingerprint(small_tree) == expected
    assert scan_fingerprint(small_tree, small_tree.parent / "cache.json") == expected


def test_scan_fingerprint_follows_content_not_timestamps(
    small_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "state" / "scan.json"
    reads = _count_reads(monkeypatch)
    start = scan_fingerprint(small_tree, cache)
    assert sorted(reads) == ["one.jpg", "one_copy.jpeg", "three.webp", "two.png"]
    entries = json.loads(cache.read_text())["files"]
    assert entries["cat/a/two.png"][4] == _sha(small_tree / "cat/a/two.png")
    cache_id = (cache.stat().st_ino, cache.stat().st_mtime_ns)

    reads.clear()
    assert scan_fingerprint(small_tree, cache) == start
    assert reads == []  # nothing re-read
    assert (cache.stat().st_ino, cache.stat().st_mtime_ns) == cache_id  # nor rewritten

    two = small_tree / "cat" / "a" / "two.png"
    os.utime(two, ns=(two.stat().st_atime_ns, two.stat().st_mtime_ns + 10**9))  # touch
    assert scan_fingerprint(small_tree, cache) == start
    assert reads == ["two.png"]  # re-hashed once, same bytes

    fingerprints = {start}

    def changed() -> str:
        value = scan_fingerprint(small_tree, cache)
        assert value not in fingerprints and value == scan_fingerprint(small_tree)  # cache agrees with none
        fingerprints.add(value)
        return value

    # edit keeping size and mtime (as cp -p / rsync -t can): caught by the ctime in the signature
    data, mtime = two.read_bytes(), two.stat().st_mtime_ns
    two.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    os.utime(two, ns=(mtime, mtime))
    changed()
    _save(small_tree / "cat" / "b" / "new.png", Image.new("RGB", (2, 2)), "PNG")  # add
    changed()
    (small_tree / "cat" / "b" / "new.png").rename(small_tree / "cat" / "b" / "renamed.png")  # rename
    changed()
    (small_tree / "cat" / "b" / "three.webp").unlink()  # remove
    changed()
    assert sorted(json.loads(cache.read_text())["files"]) == discover(small_tree)  # removed entries dropped
    (small_tree / "cat" / "b" / "out.png").symlink_to(tmp_path / "elsewhere.png")  # not scanned: no change
    with pytest.warns(StimuliScanWarning):
        assert scan_fingerprint(small_tree, cache) in fingerprints


def test_scan_fingerprint_rebuilds_a_bad_cache_and_marks_oversized_files(
    small_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = scan_fingerprint(small_tree)
    cache = tmp_path / "scan.json"
    for junk in ("not json", '{"format": "other", "files": {}}', '{"format": "sbssl-scan-cache-1", "files": []}'):
        cache.write_text(junk)
        assert scan_fingerprint(small_tree, cache) == expected
        assert len(json.loads(cache.read_text())["files"]) == 4
    # an oversized file is "too_large" whatever its bytes (its manifest row does not depend on them)
    monkeypatch.setattr(stim, "MAX_IMAGE_BYTES", (small_tree / "cat/b/three.webp").stat().st_size - 1)
    big = scan_fingerprint(small_tree, cache)
    assert big != expected
    three = small_tree / "cat" / "b" / "three.webp"
    three.write_bytes(three.read_bytes()[::-1])
    assert scan_fingerprint(small_tree, cache) == big
