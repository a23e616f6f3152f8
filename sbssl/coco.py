"""The COCO 2014 gender data set of the leakage lineage (Zhao et al., EMNLP 2017; Wang et al., ICCV 2019).

:func:`coco_annotations` turns the official COCO 2014 annotation files into the annotations table of
:mod:`sbssl.leakage` (``ANN.csv``): one row per image with ``image_id``, ``split``, ``gender`` (man/woman)
and one 0/1 ``label_<name>`` column per object category. :func:`fetch_coco_annotations` downloads and
unpacks the official archive, pinning its sha256 in a lock file on the first fetch.

What their code does, and what it does not
------------------------------------------
Wang et al. (github uvavision/Balanced-Datasets-Are-Not-Enough@023c4ff) ship the COCO table only as pickles
(``object_multilabel/data/{train,val,test}.data``: per image ``image_id``, ``file_name``, an ``objects``
0/1 vector over 79 categories and a ``gender`` one-hot [man, woman]); the code that derived gender from the
captions is not in the repository, nor in Zhao et al.'s (uclanlp/reducingbias), which also ships pickles
only. What the pickles show (read here, ``pickle`` with globals refused):

- 79 labels: the 80 COCO categories without ``person`` (``object_id.map``), named as COCO's names with
  spaces as underscores (``teddy_bear``, ``hair_drier``) -- the slugs below give the same names;
- every image has at least one of the 79 labels (none of the 5,367 val / 5,473 test rows is all zero);
- train from train2014; val and test both from val2014, disjoint (5,367 / 5,473 images, 3,813 / 3,894 of
  them man). Their val and test are subsets of Zhao et al.'s dev and test id lists (5,413 / 5,510 ids,
  published as text by kayburns/women-snowboard@a5c3f5e ``research/im2txt/data/bias_splits``); the 46 + 37
  images dropped are, by the point above, those with ``person`` as their only label. How Zhao et al. cut
  val2014 in two is not published.

The rule implemented here
-------------------------
1. Gender: each caption of the image is lower-cased and split into alphabetic tokens (``[a-z]+``; "man's"
   gives "man"). The image is ``man`` when some caption holds a word of :data:`MALE_WORDS` and no caption
   holds a word of :data:`FEMALE_WORDS`, ``woman`` in the mirror case; images whose captions mention both
   genders, or neither, are dropped. This is the rule the lineage describes (gendered words in the captions,
   images with both dropped); whole-token matching, no stemming.
2. Labels: an image has label c when instances_<split>2014.json holds at least one annotation (crowd
   annotations included) of category c. Categories in :data:`EXCLUDED_CATEGORIES` (``person``) get no
   column, as in Wang et al., and images left with no label at all are dropped (``drop_unlabelled``).
3. Splits: every kept train2014 image is ``train``. The kept val2014 images, sorted by id, are shuffled with
   ``numpy.random.default_rng(seed).permutation``; the first ``n // 2`` are ``val``, the rest ``test``.
   This is a documented stand-in for Zhao et al.'s unpublished cut, not a reproduction of it.

The word lists
--------------
Zhao et al.'s own lists could not be found in any public source read for this module (their repository and
Wang et al.'s ship the derived pickles only; the paper text was not readable here). :data:`MALE_WORDS` and
:data:`FEMALE_WORDS` are the published gender word lists of the caption-leakage metric LIC (Hirota, Nakashima,
Garcia, CVPR 2022), rebnej/lick-caption-bias@0b4066e ``lstm_leakage.py:383-386``, used unchanged; that they
equal Zhao et al.'s is NOT verified. Pass ``male_words``/``female_words`` to use other lists.

The archive
-----------
:data:`COCO_ANNOTATIONS_URL` is the official ``annotations_trainval2014.zip`` (241 MB) over https. The COCO
site links it as http://images.cocodataset.org/...; the same bucket answers https on that host, and some
networks see a certificate mismatch there: the path-style S3 address :data:`COCO_ANNOTATIONS_S3_URL` serves
the same object under Amazon's certificate. No digest of the 2014 archive is published, so the first fetch
records its sha256 in the lock file (trust on first use, as :mod:`sbssl.models` does for checkpoints) and
every later fetch and use is checked against it, whichever of the two URLs is used.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sbssl.io import atomic_path
from sbssl.locks import exclusive, read_digest_lock, write_digest_lock
from sbssl.leakage import LABEL_PREFIX, validate_annotations

#: The official COCO 2014 train/val annotation archive, over https.
COCO_ANNOTATIONS_URL = "https://images.cocodataset.org/annotations/annotations_trainval2014.zip"
#: The same object by the path-style S3 address (valid certificate where the host above shows a mismatch).
COCO_ANNOTATIONS_S3_URL = "https://s3.amazonaws.com/images.cocodataset.org/annotations/annotations_trainval2014.zip"
#: Name of the archive's entry in the lock file.
LOCK_NAME = "coco2014_annotations"
#: What :func:`fetch_coco_annotations` extracts: our name -> member of the archive.
ARCHIVE_MEMBERS: Mapping[str, str] = {
    "instances_train2014": "annotations/instances_train2014.json",
    "instances_val2014": "annotations/instances_val2014.json",
    "captions_train2014": "annotations/captions_train2014.json",
    "captions_val2014": "annotations/captions_val2014.json",
}
#: The two COCO 2014 splits :func:`coco_annotations` reads, in row order.
COCO_SPLITS = ("train2014", "val2014")
#: Categories without a label column (Wang et al.'s 79 labels are COCO's 80 without person).
EXCLUDED_CATEGORIES = ("person",)
#: Gender words (LIC, Hirota et al. CVPR 2022; rebnej/lick-caption-bias@0b4066e lstm_leakage.py:383-384).
MALE_WORDS: tuple[str, ...] = (
    "man", "men", "male", "father", "gentleman", "gentlemen", "boy", "boys", "uncle", "husband", "actor",
    "prince", "waiter", "son", "he", "his", "him", "himself", "brother", "brothers", "guy", "guys", "emperor",
    "emperors", "dude", "dudes", "cowboy",
)  # fmt: skip
#: Gender words (LIC, Hirota et al. CVPR 2022; rebnej/lick-caption-bias@0b4066e lstm_leakage.py:385-386).
FEMALE_WORDS: tuple[str, ...] = (
    "woman", "women", "female", "lady", "ladies", "mother", "girl", "girls", "aunt", "wife", "actress",
    "princess", "waitress", "daughter", "she", "her", "hers", "herself", "sister", "sisters", "queen", "queens",
    "pregnant",
)  # fmt: skip
WORD_LIST_SOURCE = (
    "LIC gender words (Hirota, Nakashima, Garcia, CVPR 2022), rebnej/lick-caption-bias@0b4066e "
    "lstm_leakage.py:383-386; Zhao et al. 2017's own lists were not found"
)

_TOKEN = re.compile(r"[a-z]+")
_SLUG = re.compile(r"[^a-z0-9]+")
#: Largest archive member extracted (instances_train2014.json is ~330 MB); guards against a zip bomb.
_MAX_MEMBER_BYTES = 2 << 30


# ----------------------------------------------------------------------------------------------------
# Gender from captions, labels from instances


def category_slug(name: str) -> str:
    """COCO category name -> label name: lower case, runs of other characters -> ``_`` ("teddy bear" -> teddy_bear)."""
    slug = _SLUG.sub("_", name.lower()).strip("_")
    if not slug:
        raise ValueError(f"COCO category name {name!r} gives an empty label name")
    return slug


def caption_gender(
    captions: Iterable[str], male_words: Iterable[str] = MALE_WORDS, female_words: Iterable[str] = FEMALE_WORDS
) -> str | None:
    """``"man"``, ``"woman"`` or None (both or neither mentioned) for one image's captions; rule 1 of the module doc."""
    male, female = {w.lower() for w in male_words}, {w.lower() for w in female_words}
    tokens = {t for caption in captions for t in _TOKEN.findall(caption.lower())}
    has_male, has_female = bool(tokens & male), bool(tokens & female)
    if has_male == has_female:
        return None
    return "man" if has_male else "woman"


def _read_coco(path: str | os.PathLike[str], kind: str, split: str) -> dict[str, Any]:
    """A COCO annotation JSON with the keys ``kind`` needs; errors name the file and what it should be."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"COCO {kind} file for {split} not found: {file}")
    try:
        with open(file, encoding="utf-8") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file}: not valid JSON ({exc}); expected COCO's {kind}_{split}.json") from None
    need = {"instances": ("images", "annotations", "categories"), "captions": ("images", "annotations")}[kind]
    missing = [k for k in need if not isinstance(data, dict) or k not in data]
    if missing:
        raise ValueError(f"{file}: key(s) {missing} missing; expected COCO's {kind}_{split}.json")
    if kind == "captions" and data["annotations"] and "caption" not in data["annotations"][0]:
        raise ValueError(
            f"{file}: annotations have no 'caption'; is this an instances file? expected captions_{split}.json"
        )
    if kind == "instances" and data["annotations"] and "category_id" not in data["annotations"][0]:
        raise ValueError(f"{file}: annotations have no 'category_id'; expected instances_{split}.json")
    return data


def _paths(paths: Mapping[str, str | os.PathLike[str]], kind: str) -> dict[str, Path]:
    if not isinstance(paths, Mapping) or set(paths) != set(COCO_SPLITS):
        got = sorted(paths) if isinstance(paths, Mapping) else type(paths).__name__
        raise ValueError(f"{kind} paths: expected a mapping with the keys {list(COCO_SPLITS)}, got {got}")
    return {split: Path(paths[split]) for split in COCO_SPLITS}


def coco_annotations(
    instances_paths: Mapping[str, str | os.PathLike[str]],
    captions_paths: Mapping[str, str | os.PathLike[str]],
    *,
    seed: int,
    male_words: Iterable[str] = MALE_WORDS,
    female_words: Iterable[str] = FEMALE_WORDS,
    exclude_categories: Iterable[str] = EXCLUDED_CATEGORIES,
    drop_unlabelled: bool = True,
) -> pd.DataFrame:
    """The COCO 2014 gender annotations table (rules 1-3 of the module doc), in the format of ``ANN.csv``.

    ``instances_paths`` / ``captions_paths``: ``{"train2014": path, "val2014": path}`` of COCO's
    ``instances_*2014.json`` / ``captions_*2014.json``. ``seed``: the val2014 -> val/test cut.
    ``exclude_categories``: COCO category names without a column; ``drop_unlabelled``: drop images with
    no label left (Wang et al.'s data has none).

    Columns: ``image_id`` (str of COCO's integer id), ``split`` (train/val/test), ``gender`` (man/woman),
    ``file_name`` (COCO's image file name), then ``label_<slug>`` (int8 0/1) per category in COCO id order.
    Rows: train, then val, then test, each by increasing image id. Raises FileNotFoundError/ValueError
    naming the file for a missing or malformed file, a captions file whose images are not those of the
    matching instances file, or categories that differ between the two splits.
    """
    instances, captions = _paths(instances_paths, "instances"), _paths(captions_paths, "captions")
    excluded = {str(c) for c in exclude_categories}
    male, female = tuple(male_words), tuple(female_words)
    if not male or not female:
        raise ValueError("male_words and female_words must each hold at least one word")
    if set(map(str.lower, male)) & set(map(str.lower, female)):
        shared = sorted(set(map(str.lower, male)) & set(map(str.lower, female)))
        raise ValueError(f"words in both gender lists: {shared}")
    frames, categories = [], None
    for split in COCO_SPLITS:
        inst = _read_coco(instances[split], "instances", split)
        caps = _read_coco(captions[split], "captions", split)
        cats = sorted((int(c["id"]), str(c["name"])) for c in inst["categories"])
        if categories is None:
            categories = cats
        elif cats != categories:
            raise ValueError(
                f"{instances[split]}: categories differ from {instances['train2014']}; use COCO 2014 files"
            )
        unknown_excluded = excluded - {name for _, name in cats}
        if unknown_excluded:
            raise ValueError(
                f"exclude_categories {sorted(unknown_excluded)} are not COCO categories of {instances[split]}"
            )
        images = {int(img["id"]): str(img.get("file_name", "")) for img in inst["images"]}
        texts: dict[int, list[str]] = {}
        for ann in caps["annotations"]:
            texts.setdefault(int(ann["image_id"]), []).append(str(ann["caption"]))
        stray = sorted(set(texts) - set(images))
        if stray:
            raise ValueError(
                f"{captions[split]}: {len(stray)} captioned image(s) not in {instances[split]} (e.g. {stray[:3]}); "
                "pass the captions and instances files of the same split"
            )
        columns = [cid for cid, name in cats if name not in excluded]
        index = {cid: j for j, cid in enumerate(columns)}
        genders = {i: caption_gender(t, male, female) for i, t in texts.items()}
        kept = sorted(i for i, g in genders.items() if g is not None)
        row_of = {i: r for r, i in enumerate(kept)}
        labels = np.zeros((len(kept), len(columns)), dtype=np.int8)
        for ann in inst["annotations"]:
            r, j = row_of.get(int(ann["image_id"])), index.get(int(ann["category_id"]))
            if r is not None and j is not None:
                labels[r, j] = 1
        frame = pd.DataFrame({
            "image_id": [str(i) for i in kept],
            "split": "train" if split == "train2014" else "",
            "gender": [genders[i] for i in kept],
            "file_name": [images[i] for i in kept],
        })
        names = [f"{LABEL_PREFIX}{category_slug(dict(cats)[cid])}" for cid in columns]
        frame = pd.concat([frame, pd.DataFrame(labels, columns=names)], axis=1)
        if drop_unlabelled:
            frame = frame[labels.any(axis=1)].reset_index(drop=True)
        frames.append(frame)
    train, val = frames
    order = np.random.default_rng(seed).permutation(len(val))  # val rows are sorted by id already
    is_val = np.zeros(len(val), dtype=bool)
    is_val[order[: len(val) // 2]] = True
    val["split"] = np.where(is_val, "val", "test")
    table = pd.concat([train, val[is_val], val[~is_val]], ignore_index=True)
    duplicated = table["image_id"][table["image_id"].duplicated()]
    if len(duplicated):
        raise ValueError(
            f"image id(s) {duplicated.tolist()[:3]} in both train2014 and val2014 files; use COCO 2014 files"
        )
    label_names = [c for c in table.columns if c.startswith(LABEL_PREFIX)]
    if len(set(label_names)) != len(label_names):
        raise ValueError(f"two COCO categories give the same label name: {label_names}")
    return table


def write_annotations(table: pd.DataFrame, path: str | os.PathLike[str], attribute: str = "gender") -> Path:
    """Check ``table`` (:func:`sbssl.leakage.validate_annotations`) and write it as an annotations CSV, atomically."""
    checked = validate_annotations(table, attribute, source="annotations table")
    target = Path(path)
    with atomic_path(target) as tmp:
        checked.to_csv(tmp, index=False)
    return target


# ----------------------------------------------------------------------------------------------------
# The archive, pinned in a lock file

_LOCK_HEADER = """\
# Full sha256 of every data archive sbssl has fetched (sbssl.coco.fetch_coco_annotations), one entry per
# archive. Written on the first fetch (no digest is published for these files); every later fetch and use is
# checked against it. Keep it under version control. To accept a new file on purpose, delete its entry.
"""


def read_data_lock(path: str | os.PathLike[str]) -> dict[str, dict[str, str]]:
    """The data lock (:mod:`sbssl.locks` format, the weights lock's); ``{}`` if absent."""
    return read_digest_lock(path, "data lock")


def _record(lock_path: Path, name: str, url: str, sha256: str) -> None:
    """Add ``name``'s entry unless present (then it must agree): under the flock, re-read, merge, atomic rewrite."""
    from sbssl.download import HashMismatchError

    with exclusive(lock_path):
        entries = read_data_lock(lock_path)
        if name in entries:
            if entries[name]["sha256"] != sha256:
                raise HashMismatchError(
                    f"{lock_path} was meanwhile given sha256 {entries[name]['sha256']} for {name}, but the file "
                    f"fetched here has {sha256}; delete the archive and fetch again"
                )
            return
        entries[name] = {"url": url, "sha256": sha256}
        write_digest_lock(lock_path, entries, _LOCK_HEADER)


def _extract(archive: Path, member: str, target: Path) -> Path:
    """Copy one named member of ``archive`` to ``target`` atomically. The output path never comes from the
    archive, so member names cannot write outside ``target``'s folder; sizes are capped."""
    with zipfile.ZipFile(archive) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise ValueError(f"{archive}: no member {member!r}; is this annotations_trainval2014.zip?") from None
        if info.is_dir() or info.file_size > _MAX_MEMBER_BYTES:
            raise ValueError(f"{archive}: member {member!r} is a folder or larger than {_MAX_MEMBER_BYTES} bytes")
        with atomic_path(target) as tmp, zf.open(info) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)  # zipfile checks the CRC at the end of the member
    return target


def fetch_coco_annotations(
    dest_dir: str | os.PathLike[str],
    *,
    lock_path: str | os.PathLike[str],
    url: str = COCO_ANNOTATIONS_URL,
    retries: int = 3,
    timeout: float = 60,
    progress: bool = True,
) -> dict[str, Path]:
    """Download the COCO 2014 annotation archive to ``dest_dir`` and extract the four JSONs beside it.

    - ``url`` must be https:// or file:// (a plain-http download could be altered in transit).
    - With an entry :data:`LOCK_NAME` in ``lock_path``: a present archive with that sha256 is used as is;
      otherwise it is downloaded (:func:`sbssl.download.download`: retries, atomic rename) and must have that
      sha256 (HashMismatchError otherwise, nothing replaced). The URL may differ from the recorded one (a
      mirror): the digest is what is checked.
    - Without an entry: the archive is downloaded (a present file is not trusted) and its sha256 recorded.
    - ``dest_dir/<name>.json`` for each of :data:`ARCHIVE_MEMBERS` is (re)written atomically from the
      verified archive. Returns ``{name: path}`` for the four JSONs and ``"archive"``.
    """
    from sbssl.download import download, file_digests

    if not url.startswith(("https://", "file://")):
        raise ValueError(f"url {url!r}: only https:// or file:// (http can be altered in transit; "
                         f"use {COCO_ANNOTATIONS_URL} or {COCO_ANNOTATIONS_S3_URL})")
    out, lock = Path(dest_dir), Path(lock_path)
    archive = out / "annotations_trainval2014.zip"
    entry = read_data_lock(lock).get(LOCK_NAME)
    common = dict(retries=retries, timeout=timeout, progress=progress)
    if entry is not None:
        download(url, archive, sha256=entry["sha256"], keep_present=True, **common)
    else:
        download(url, archive, keep_present=False, **common)
        _record(lock, LOCK_NAME, url, file_digests(archive)["sha256"])
    paths = {name: _extract(archive, member, out / f"{name}.json") for name, member in ARCHIVE_MEMBERS.items()}
    return {**paths, "archive": archive}
