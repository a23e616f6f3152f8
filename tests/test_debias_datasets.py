"""Debiasing data: the embedded colored-digits set, Waterbirds and CelebA read from tiny folders in their real
layouts, and the Waterbirds archive fetched (file://) with its sha256 locked on first fetch."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sbssl.debias import datasets as D
from sbssl.download import HashMismatchError


def test_colored_digits_design() -> None:
    data = D.colored_digits()
    assert {k: len(s) for k, s in data.splits.items()} == {"train": 1000, "val": 400, "test": 397}
    assert data.group_names == ("digit<5/red", "digit<5/green", "digit>=5/red", "digit>=5/green")
    train = data.splits["train"]
    for c in (0, 1):
        members = train.y == c
        assert np.mean(train.a[members] == c) == pytest.approx(0.9, abs=0.5 / members.sum())
    for name in ("val", "test"):
        split = data.splits[name]
        for c in (0, 1):
            assert abs(int(np.sum(split.a[split.y == c] == 0)) - int(np.sum(split.a[split.y == c] == 1))) <= 1
    images = train.images
    assert images.shape == (1000, 3, 8, 8) and images.dtype == torch.float32
    # blank paper (no ink) carries the tint itself: red (1, .6, .6), green (.6, 1, .6)
    corner = images[:, :, 0, 0]  # the digits' corners are blank
    red = torch.from_numpy(train.a == 0)
    assert torch.allclose(corner[red], torch.tensor([1.0, 0.6, 0.6]).expand(int(red.sum()), 3))
    assert torch.allclose(corner[~red], torch.tensor([0.6, 1.0, 0.6]).expand(int((~red).sum()), 3))
    # same data seed, same set; another seed, another split
    again = D.colored_digits()
    assert torch.equal(again.splits["test"].images, data.splits["test"].images)
    assert not np.array_equal(D.colored_digits(1).splits["train"].y, train.y)
    with pytest.raises(ValueError, match="aligned"):
        D.colored_digits(aligned=0.3)


def _png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (20, 24)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="PNG")  # lossless under the data sets' .jpg names


def waterbirds_folder(root: Path, n_per_split: int = 8) -> Path:
    """A Waterbirds folder in GroupDRO's layout: metadata.csv (img_id, img_filename, y, split, place,
    place_filename) and images under per-species folders; each split holds every (y, place) group."""
    rows = ["img_id,img_filename,y,split,place,place_filename"]
    i = 0
    for split in (0, 1, 2):
        for j in range(n_per_split):
            y, place = j % 2, (j // 2) % 2
            name = f"{'001.Black_footed_Albatross' if y else '002.Laysan_Albatross'}/img_{i}.jpg"
            _png(root / name, (40 * y + 20, 200 * place, 90))
            rows.append(f"{i + 1},{name},{y},{split},{place},/x/y.jpg")
            i += 1
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


def test_load_waterbirds_tiny_folder(tmp_path: Path) -> None:
    root = waterbirds_folder(tmp_path / "wb")
    data = D.load_waterbirds(root, image_size=16)
    assert data.group_names == ("landbird/land", "landbird/water", "waterbird/land", "waterbird/water")
    assert data.group_counts()["val"] == dict.fromkeys(data.group_names, 2)
    train = data.splits["train"]
    assert train.y.tolist() == [0, 1, 0, 1, 0, 1, 0, 1] and train.a.tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    ((idx, x),) = list(train.batches([np.array([3, 0])]))
    assert idx.tolist() == [3, 0] and x.shape == (2, 3, 16, 16)
    # ImageNet-normalised: image 3 is (60, 200, 90) everywhere
    expected = (torch.tensor([60, 200, 90]) / 255 - torch.tensor(D.IMAGENET_MEAN)) / torch.tensor(D.IMAGENET_STD)
    assert torch.allclose(x[0, :, 8, 8], expected, atol=1e-5)


def test_load_waterbirds_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="fetch_waterbirds"):
        D.load_waterbirds(tmp_path)
    root = waterbirds_folder(tmp_path / "wb")
    (root / "002.Laysan_Albatross" / "img_0.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="img_0.jpg"):
        D.load_waterbirds(root)
    (root / "metadata.csv").write_text("img_id,img_filename,y,split\n1,a.jpg,0,0\n")
    with pytest.raises(ValueError, match=r"missing columns \['place'\]"):
        D.load_waterbirds(root)
    (root / "metadata.csv").write_text("img_filename,y,split,place\na.jpg,2,0,0\n")
    with pytest.raises(ValueError, match="'y' has values \\[2\\]"):
        D.load_waterbirds(root)


def celeba_folder(root: Path) -> Path:
    """A CelebA folder in the official layout: 3 attributes, 12 images of 20 x 24 (w x h) over three splits."""
    names = ["Blond_Hair", "Male", "Smiling"]
    lines = ["12", " ".join(names)]
    partition = []
    for i in range(12):
        blond, male = (1 if i % 2 else -1), (1 if (i // 2) % 2 else -1)
        file = f"{i + 1:06d}.jpg"
        lines.append(f"{file} {blond:2d} {male:2d} -1")
        partition.append(f"{file} {i // 4}")
        _png(root / "img_align_celeba" / file, (250 if blond == 1 else 30, 100, 100))
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(partition) + "\n")
    return root


def test_load_celeba_tiny_folder(tmp_path: Path) -> None:
    data = D.load_celeba(celeba_folder(tmp_path), image_size=10)
    assert data.group_names == ("not Blond_Hair/female", "not Blond_Hair/male", "Blond_Hair/female", "Blond_Hair/male")
    assert data.splits["train"].y.tolist() == [0, 1, 0, 1] and data.splits["train"].a.tolist() == [0, 0, 1, 1]
    assert data.group_counts()["test"] == dict.fromkeys(data.group_names, 1)
    ((_, x),) = list(data.splits["val"].batches([np.arange(4)]))
    assert x.shape == (4, 3, 10, 10)  # centre square crop of 20 x 24, resized
    smiling = D.load_celeba(tmp_path, target="Smiling", bias="Male", image_size=10)
    assert smiling.splits["train"].y.tolist() == [0, 0, 0, 0]


def test_load_celeba_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="list_attr_celeba.txt"):
        D.load_celeba(tmp_path)
    root = celeba_folder(tmp_path)
    with pytest.raises(ValueError, match="no attribute 'Wavy_Hair'"):
        D.load_celeba(root, target="Wavy_Hair")
    (root / "list_eval_partition.txt").write_text("000001.jpg 0\n")
    with pytest.raises(ValueError, match="have no split"):
        D.load_celeba(root)
    (root / "list_attr_celeba.txt").write_text("3\nBlond_Hair Male\n000001.jpg 1 1\n")
    with pytest.raises(ValueError, match="expected 3 rows"):
        D.load_celeba(root)


def test_load_dataset_dispatch(tmp_path: Path) -> None:
    assert D.load_dataset("colored-digits", aligned=0.95).name == "colored-digits"
    with pytest.raises(ValueError, match="takes no data folder"):
        D.load_dataset("colored-digits", tmp_path)
    with pytest.raises(ValueError, match="needs its local folder"):
        D.load_dataset("celeba")
    with pytest.raises(ValueError, match="unknown debias data set"):
        D.load_dataset("mnist", tmp_path)


def _archive(path: Path, tmp: Path, marker: str) -> str:
    folder = waterbirds_folder(tmp / f"src-{marker}" / D.WATERBIRDS_FOLDER, n_per_split=4)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=D.WATERBIRDS_FOLDER)
        note = marker.encode()
        info = tarfile.TarInfo(f"{D.WATERBIRDS_FOLDER}/NOTE")
        info.size = len(note)
        tar.addfile(info, io.BytesIO(note))
    return path.as_uri()


def test_fetch_waterbirds_locks_the_archive_on_first_fetch(tmp_path: Path) -> None:
    source = tmp_path / "waterbird_complete95_forest2water2.tar.gz"
    url = _archive(source, tmp_path, "first")
    lock, dest = tmp_path / "data.lock", tmp_path / "data"
    folder = D.fetch_waterbirds(dest, lock, url=url, progress=False)
    assert folder == dest / D.WATERBIRDS_FOLDER and (folder / "NOTE").read_text() == "first"
    assert D.load_waterbirds(folder, image_size=8).group_counts()["train"]["waterbird/water"] == 1
    entry = D.read_data_lock(lock)["waterbirds"]
    from sbssl.download import file_digests

    assert entry == {"url": url, "sha256": file_digests(source)["sha256"]}
    assert D.fetch_waterbirds(dest, lock, url=url, progress=False) == folder  # present: no new fetch
    # the source changes: a fresh fetch is refused by the locked digest
    _archive(source, tmp_path, "second")
    (dest / source.name).unlink()
    with pytest.raises(HashMismatchError):
        D.fetch_waterbirds(dest, lock, url=url, progress=False)
    with pytest.raises(ValueError, match="differs from the one locked"):
        D.fetch_waterbirds(dest, lock, url=url + "?v=2", progress=False)
