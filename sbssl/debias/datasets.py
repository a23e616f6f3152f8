"""The debiasing data sets: each split holds images, a target class ``y`` and a bias attribute ``a``.

- ``colored-digits`` (:func:`colored_digits`, embedded, no download): scikit-learn's bundled 8x8 digits
  (1,797 images) drawn dark on white paper (``1 - ink / 16``), the paper tinted ``red`` (1, .6, .6) or
  ``green`` (.6, 1, .6) (each RGB channel times the paper's brightness; the ink stays dark); target
  ``y = digit >= 5``, bias ``a`` = the tint. In train the tint agrees with the target (``red`` for digits
  < 5) for ``aligned`` = 90% of each class, exactly; in val and test each class is split exactly half and
  half. The soft tints and 90% follow the measured trials (shared/design/MEASURED-FACTS.md): with saturated
  tints only true-group reweighting helped. The tint covers the paper, so it dominates the raw pixels
  (per-class k-means on them isolates each class's minority tint, as measured) and is learnt long before
  the shape, like Waterbirds' background. Split sizes 1000 / 400 / 397 (the rest), drawn with
  ``data_seed``; the 1000 training images need no upsampling. ERM's worst group here depends on the epoch
  budget, not only on the design: the small CNN of :mod:`sbssl.debias.train` keeps a validation worst group
  of 0 for about 45 epochs, then starts to learn the shape, and the selected (late) epoch gives a test worst
  group of about 0.3 at 60 epochs and 0.6 at 120 (the trials' 0.05 came from a network and budget that are
  not recorded); at ``aligned=0.95`` ERM stays near 0.05 for 60 epochs. The same budget holds for every
  method.
- ``waterbirds`` (:func:`load_waterbirds`): the folder of Sagawa et al.'s archive
  (:data:`WATERBIRDS_URL`, fetched by :func:`fetch_waterbirds`): ``metadata.csv`` with ``img_filename``,
  ``y`` (1 = waterbird), ``split`` (0/1/2 = train/val/test) and ``place`` (1 = water background, the bias).
- ``celeba`` (:func:`load_celeba`): a local folder with ``list_attr_celeba.txt``,
  ``list_eval_partition.txt`` and ``img_align_celeba/``; target any of the 40 attributes (default
  ``Blond_Hair``, Sagawa et al.'s setting; ClusterFix's list of targets was not available here, so any
  attribute name is accepted), bias attribute ``Male``. CelebA has no stable direct-download
  URL (Google Drive, quota-limited), so it is read from a local folder only.

Image preprocessing follows GroupDRO's code (no augmentation): Waterbirds resized to (size * 256/224)^2 and
centre-cropped to ``size``; CelebA centre-cropped to a square of its short side (178 px for the aligned
images) and resized to ``size``; both normalised with the ImageNet mean and std.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sbssl.locks import exclusive, read_digest_lock, write_digest_lock

DATASETS = ("colored-digits", "waterbirds", "celeba")
SPLITS = ("train", "val", "test")
#: Waterbirds as GroupDRO (Sagawa et al. 2020) publishes it, the archive ClusterFix's README points to (per
#: issue 12; the URL is the one GroupDRO-based code uses, not checked live: no network here).
WATERBIRDS_URL = "https://nlp.stanford.edu/data/dro/waterbird_complete95_forest2water2.tar.gz"
WATERBIRDS_FOLDER = "waterbird_complete95_forest2water2"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: colored-digits tints (RGB multipliers of the grey level) for bias value 0 (red) and 1 (green).
SOFT_TINTS = ((1.0, 0.6, 0.6), (0.6, 1.0, 0.6))


class _ImageFiles(torch.utils.data.Dataset):
    """Images decoded from files on use (RGB), passed through ``transform``; item i is a (C, H, W) tensor."""

    def __init__(self, files: tuple[str, ...], transform: Any) -> None:
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        try:
            with Image.open(self.files[i]) as image:
                return self.transform(image.convert("RGB"))
        except OSError as exc:
            raise OSError(f"image {self.files[i]}: cannot be read ({exc})") from exc


@dataclass(frozen=True)
class Split:
    """One split: targets ``y`` and bias values ``a`` (int64 arrays (N,)) and the images, either in memory
    (``images``: float32 tensor (N, C, H, W)) or as files decoded with ``transform`` (``files``: N paths)."""

    y: np.ndarray
    a: np.ndarray
    images: torch.Tensor | None = None
    files: tuple[str, ...] | None = None
    transform: Any = None

    def __len__(self) -> int:
        return len(self.y)

    def batches(
        self, index_lists: list[np.ndarray], *, num_workers: int = 0
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Yield ``(indices, images (b, C, H, W))`` for each index array, in order (decoded by ``num_workers``
        DataLoader workers when the split is file-based)."""
        if self.images is not None:
            for idx in index_lists:
                yield idx, self.images[torch.as_tensor(idx)]
            return
        loader = torch.utils.data.DataLoader(
            _ImageFiles(self.files, self.transform), batch_sampler=[list(map(int, i)) for i in index_lists],
            num_workers=num_workers,
        )
        yield from zip(index_lists, loader)


@dataclass(frozen=True)
class DebiasData:
    """A data set for debiasing: three :class:`Split` s, the names of the target classes and of the bias
    values. Group of a sample: ``g = y * n_bias + a``, named ``"<class>/<bias value>"``."""

    name: str
    splits: dict[str, Split]
    class_names: tuple[str, ...]
    bias_names: tuple[str, ...]
    target: str = "y"
    bias: str = "a"

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def n_bias(self) -> int:
        return len(self.bias_names)

    @property
    def group_names(self) -> tuple[str, ...]:
        return tuple(f"{c}/{b}" for c in self.class_names for b in self.bias_names)

    def groups(self, split: str) -> np.ndarray:
        """Group index ``y * n_bias + a`` of every sample of ``split`` (int64 (N,))."""
        s = self.splits[split]
        return s.y * self.n_bias + s.a

    def group_counts(self) -> dict[str, dict[str, int]]:
        """``{split: {group name: samples}}``."""
        n = len(self.group_names)
        return {name: dict(zip(self.group_names, map(int, np.bincount(self.groups(name), minlength=n))))
                for name in SPLITS}


def _check(data: DebiasData) -> DebiasData:
    if set(data.splits) != set(SPLITS):
        raise ValueError(f"{data.name}: expected the splits {list(SPLITS)}, got {sorted(data.splits)}")
    for name, split in data.splits.items():
        if len(split) == 0:
            raise ValueError(f"{data.name}: the {name} split is empty")
        for field, values, n in (("y", split.y, data.n_classes), ("a", split.a, data.n_bias)):
            if values.min() < 0 or values.max() >= n:
                raise ValueError(f"{data.name}: {name} split has {field} values outside [0, {n})")
    return data


# --- colored-digits -----------------------------------------------------------------------------------------

def colored_digits(
    data_seed: int = 0, *, aligned: float = 0.9, n_train: int = 1000, n_val: int = 400,
    tints: tuple[tuple[float, float, float], tuple[float, float, float]] = SOFT_TINTS,
) -> DebiasData:
    """The embedded spurious-correlation set (see the module doc): images (N, 3, 8, 8) in [0, 1].

    ``aligned``: fraction of each training class whose tint agrees with its class (bias value = class),
    exactly (rounded per class); val and test are exactly balanced within each class (odd counts: the extra
    image gets bias value 0). ``data_seed`` fixes the split and the tint draws, so training seeds vary the
    training only.
    """
    from sklearn.datasets import load_digits

    if not 0.5 <= aligned <= 1:
        raise ValueError(f"colored-digits: aligned must lie in [0.5, 1], got {aligned}")
    digits = load_digits()
    paper = 1.0 - digits.images.astype(np.float32) / 16.0  # 1 = white paper, 0 = full ink
    y_all = (digits.target >= 5).astype(np.int64)
    if not (0 < n_train and 0 < n_val and n_train + n_val < len(y_all)):
        raise ValueError(f"colored-digits: need 0 < n_train, 0 < n_val, n_train + n_val < {len(y_all)}")
    rng = np.random.default_rng(data_seed)
    order = rng.permutation(len(y_all))
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    tint = torch.tensor(tints, dtype=torch.float32)  # (2, 3)
    splits = {}
    for name, rows in parts.items():
        y = y_all[rows]
        share_aligned = aligned if name == "train" else 0.5
        a = np.empty_like(y)
        for c in (0, 1):
            members = rng.permutation(np.flatnonzero(y == c))
            n_aligned = int(round(share_aligned * members.size))
            a[members[:n_aligned]] = c
            a[members[n_aligned:]] = 1 - c
        images = torch.from_numpy(paper[rows])[:, None] * tint[torch.from_numpy(a)][:, :, None, None]
        splits[name] = Split(y=y, a=a, images=images.contiguous())
    return _check(DebiasData("colored-digits", splits, ("digit<5", "digit>=5"), ("red", "green"), "digit>=5", "tint"))


# --- real data sets -----------------------------------------------------------------------------------------

class _SquareCentreCrop:
    """Centre crop to a square of the image's shorter side (CelebA's aligned 178 x 218 -> 178 x 178)."""

    def __call__(self, image: Any) -> Any:
        from torchvision.transforms.functional import center_crop

        return center_crop(image, [min(image.size)] * 2)


def image_transform(dataset: str, image_size: int = 224) -> Any:
    """GroupDRO's evaluation preprocessing for ``dataset`` (see the module doc); a torchvision transform."""
    from torchvision import transforms as T

    tail = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if dataset == "waterbirds":
        resized = int(image_size * 256 / 224)
        return T.Compose([T.Resize((resized, resized)), T.CenterCrop(image_size), *tail])
    if dataset == "celeba":
        return T.Compose([_SquareCentreCrop(), T.Resize(image_size), *tail])
    raise ValueError(f"no image transform for data set {dataset!r}")


def _require(path: Path, what: str, remedy: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} not found; {remedy}")
    return path


def load_waterbirds(root: str | os.PathLike[str], *, image_size: int = 224) -> DebiasData:
    """Waterbirds from its extracted folder (``metadata.csv`` + images; see the module doc).

    Raises FileNotFoundError for a missing folder, metadata or image, ValueError for missing columns or
    values other than 0/1 (``y``, ``place``) and 0/1/2 (``split``).
    """
    import pandas as pd

    folder = Path(root)
    remedy = f"fetch it (sbssl.debias.fetch_waterbirds, {WATERBIRDS_URL}) or give the extracted folder"
    meta_path = _require(folder / "metadata.csv", "Waterbirds metadata", remedy)
    meta = pd.read_csv(meta_path)
    missing = sorted({"img_filename", "y", "split", "place"} - set(meta.columns))
    if missing:
        raise ValueError(f"{meta_path}: missing columns {missing} (expected GroupDRO's metadata.csv)")
    for column, allowed in (("y", {0, 1}), ("place", {0, 1}), ("split", {0, 1, 2})):
        bad = sorted(set(meta[column].unique().tolist()) - allowed)
        if bad:
            raise ValueError(f"{meta_path}: column {column!r} has values {bad[:5]}; expected {sorted(allowed)}")
    transform = image_transform("waterbirds", image_size)
    splits = {}
    for code, name in enumerate(SPLITS):
        rows = meta[meta["split"] == code]
        files = tuple(str(folder / f) for f in rows["img_filename"])
        absent = [f for f in files if not os.path.isfile(f)]
        if absent:
            raise FileNotFoundError(f"{meta_path}: {len(absent)} {name} image(s) not found, e.g. {absent[0]}")
        splits[name] = Split(y=rows["y"].to_numpy(np.int64), a=rows["place"].to_numpy(np.int64),
                             files=files, transform=transform)
    return _check(DebiasData("waterbirds", splits, ("landbird", "waterbird"), ("land", "water"), "waterbird", "place"))


def _read_celeba_attributes(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """``(file names, attribute names, values (N, A) in {-1, 1})`` of CelebA's ``list_attr_celeba.txt``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        count = int(lines[0].strip())
        names = lines[1].split()
        rows = [line.split() for line in lines[2:] if line.strip()]
    except (IndexError, ValueError):
        raise ValueError(
            f"{path}: not CelebA's attribute list (line 1: image count, line 2: attribute names)"
        ) from None
    if len(rows) != count or any(len(r) != len(names) + 1 for r in rows):
        raise ValueError(f"{path}: expected {count} rows of a file name and {len(names)} values each")
    values = np.array([r[1:] for r in rows], dtype=np.int64)
    if not np.isin(values, (-1, 1)).all():
        raise ValueError(f"{path}: attribute values must be -1 or 1")
    return [r[0] for r in rows], names, values


def load_celeba(
    root: str | os.PathLike[str], *, target: str = "Blond_Hair", bias: str = "Male", image_size: int = 224
) -> DebiasData:
    """CelebA from a local folder (see the module doc): ``y`` = ``target`` attribute is 1, ``a`` = ``bias`` is 1.

    The split comes from ``list_eval_partition.txt`` (0/1/2 = train/val/test). Raises FileNotFoundError for a
    missing file or image, ValueError for an unknown attribute or files that disagree on the image names.
    """
    folder = Path(root)
    remedy = "download CelebA (list_attr_celeba.txt, list_eval_partition.txt, img_align_celeba/) into it"
    attr_path = _require(folder / "list_attr_celeba.txt", "CelebA attributes", remedy)
    part_path = _require(folder / "list_eval_partition.txt", "CelebA partition", remedy)
    image_dir = _require(folder / "img_align_celeba", "CelebA image folder", remedy)
    files, names, values = _read_celeba_attributes(attr_path)
    for attribute in (target, bias):
        if attribute not in names:
            raise ValueError(f"{attr_path}: no attribute {attribute!r}; known: {names}")
    if target == bias:
        raise ValueError(f"CelebA: target and bias attribute are both {target!r}")
    partition = dict(line.split()[:2] for line in part_path.read_text(encoding="utf-8").splitlines() if line.strip())
    unknown = [f for f in files if f not in partition]
    if unknown:
        raise ValueError(f"{part_path}: {len(unknown)} image(s) of {attr_path.name} have no split, e.g. {unknown[0]}")
    split_code = np.array([int(partition[f]) for f in files])
    y = (values[:, names.index(target)] == 1).astype(np.int64)
    a = (values[:, names.index(bias)] == 1).astype(np.int64)
    transform = image_transform("celeba", image_size)
    splits = {}
    for code, name in enumerate(SPLITS):
        rows = np.flatnonzero(split_code == code)
        paths = tuple(str(image_dir / files[i]) for i in rows)
        absent = [p for p in paths if not os.path.isfile(p)]
        if absent:
            raise FileNotFoundError(f"CelebA: {len(absent)} {name} image(s) not found, e.g. {absent[0]}")
        splits[name] = Split(y=y[rows], a=a[rows], files=paths, transform=transform)
    bias_names = ("female", "male") if bias == "Male" else (f"not {bias}", bias)
    return _check(DebiasData("celeba", splits, (f"not {target}", target), bias_names, target, bias))


def load_dataset(dataset: str, data: str | os.PathLike[str] | None = None, **options: Any) -> DebiasData:
    """The named data set: ``colored-digits`` needs no ``data`` (``options``: :func:`colored_digits`' keywords);
    ``waterbirds`` / ``celeba`` read the folder ``data`` (``options``: the loader's keywords)."""
    if dataset == "colored-digits":
        if data is not None:
            raise ValueError("colored-digits is embedded; it takes no data folder")
        return colored_digits(**options)
    if dataset not in DATASETS:
        raise ValueError(f"unknown debias data set {dataset!r}; expected one of {list(DATASETS)}")
    if data is None:
        raise ValueError(f"data set {dataset!r} needs its local folder (data=...)")
    return (load_waterbirds if dataset == "waterbirds" else load_celeba)(data, **options)


# --- the Waterbirds archive, trusted on first fetch ----------------------------------------------------------

_LOCK_HEADER = """\
# Full sha256 of every data archive sbssl has fetched (sbssl.debias.fetch_waterbirds), one entry per data set.
# Recorded on the first fetch; every later fetch must match. To accept a new archive on purpose, delete
# its entry here and fetch again.
"""


def read_data_lock(path: str | os.PathLike[str]) -> dict[str, dict[str, str]]:
    """The data lock (:mod:`sbssl.locks` format); ``{}`` when the file is absent."""
    return read_digest_lock(path, "data lock")


def _locked_download(name: str, url: str, archive: Path, lock: Path, *, progress: bool) -> str:
    """Download ``url`` to ``archive`` unless a present copy matches the lock; record its sha256 on the first
    fetch; return the sha256. A present file with no lock entry is not trusted: it is fetched again."""
    from sbssl.download import download, file_digests

    with exclusive(lock):
        entry = read_data_lock(lock).get(name)
        if entry is not None and entry["url"] != url:
            raise ValueError(
                f"{name}: URL {url} differs from the one locked in {lock} ({entry['url']}); delete the entry "
                "there to accept the new source"
            )
        expected = entry["sha256"] if entry else None
        download(url, archive, sha256=expected, keep_present=expected is not None, progress=progress)
        sha256 = file_digests(archive)["sha256"]
        if entry is None:
            entries = read_data_lock(lock)
            entries[name] = {"url": url, "sha256": sha256}
            write_digest_lock(lock, entries, _LOCK_HEADER)
        return sha256


def fetch_waterbirds(
    dest_dir: str | os.PathLike[str], lock_path: str | os.PathLike[str], *, url: str = WATERBIRDS_URL,
    progress: bool = True,
) -> Path:
    """Fetch and extract the Waterbirds archive into ``dest_dir``; return the folder holding ``metadata.csv``.

    The archive (``dest_dir/<url's file name>``) is verified against ``lock_path`` (:func:`read_data_lock`);
    its first fetch records the sha256 there. It is extracted (tar ``data`` filter: no absolute paths, links
    out of the folder or device files) into a temporary folder renamed into place once complete, so an
    interrupted extraction leaves nothing half-written. An already extracted folder is returned as is.
    """
    import tempfile

    dest = Path(dest_dir)
    archive = dest / url.rsplit("/", 1)[-1]
    folder = dest / WATERBIRDS_FOLDER
    _locked_download("waterbirds", url, archive, Path(lock_path), progress=progress)
    if (folder / "metadata.csv").is_file():
        return folder
    with tempfile.TemporaryDirectory(dir=dest, prefix=".extract.") as tmp:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        found = list(Path(tmp).rglob("metadata.csv"))
        if len(found) != 1:
            raise ValueError(f"{archive}: expected one metadata.csv in the archive, found {len(found)}")
        os.replace(found[0].parent, folder)
    return folder
