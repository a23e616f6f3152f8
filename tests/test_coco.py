from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from sbssl import coco
from sbssl.download import HashMismatchError
from sbssl.leakage import leakage_report, read_annotations

CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 2, "name": "bicycle", "supercategory": "vehicle"},
    {"id": 88, "name": "teddy bear", "supercategory": "indoor"},
]


def write_coco(folder: Path, split: str, images: dict[int, tuple[list[str], list[int]]]) -> tuple[Path, Path]:
    """instances_/captions_<split>.json for {image id: (captions, category ids annotated)}."""
    imgs = [{"id": i, "file_name": f"COCO_{split}_{i:012d}.jpg"} for i in images]
    instances = {
        "images": imgs, "categories": CATEGORIES,
        "annotations": [{"id": 1000 * i + k, "image_id": i, "category_id": c}
                        for i, (_, cats) in images.items() for k, c in enumerate(cats)],
    }  # fmt: skip
    captions = {
        "images": imgs,
        "annotations": [{"id": 1000 * i + k, "image_id": i, "caption": t}
                        for i, (texts, _) in images.items() for k, t in enumerate(texts)],
    }  # fmt: skip
    paths = folder / f"instances_{split}.json", folder / f"captions_{split}.json"
    paths[0].write_text(json.dumps(instances), encoding="utf-8")
    paths[1].write_text(json.dumps(captions), encoding="utf-8")
    return paths


TRAIN = {
    1: (["A man riding a bicycle.", "A person on a bike."], [1, 2]),            # man
    2: (["Two women with a Teddy Bear", "A lady smiling"], [1, 88]),            # woman
    3: (["A man and a woman on a bench"], [1, 2]),                              # both: dropped
    4: (["A dog near a manhole cover"], [2]),                                   # neither ("manhole" is no "man")
    5: (["The man's bike", "A guy with his bicycle and a bear"], [2, 88, 2]),   # man ("man's" -> man)
    6: (["A girl alone"], [1]),                                                 # woman, only person: dropped
    7: (["A boy"], []),                                                         # man, no label: dropped
}
VAL = {
    101: (["A woman on a bike"], [2]),
    102: (["He rides"], [2]),
    103: (["She holds a teddy bear"], [88]),
    104: (["Sisters and brothers"], [2]),                                       # both: dropped
    105: (["A MAN WITH A BEAR"], [88, 1]),
    106: (["a cat"], [88]),                                                     # neither
}


@pytest.fixture()
def coco_files(tmp_path):
    train = write_coco(tmp_path, "train2014", TRAIN)
    val = write_coco(tmp_path, "val2014", VAL)
    return {"train2014": train[0], "val2014": val[0]}, {"train2014": train[1], "val2014": val[1]}


def test_caption_gender_rule():
    assert coco.caption_gender(["A man", "a person"]) == "man"
    assert coco.caption_gender(["Her umbrella"]) == "woman"
    assert coco.caption_gender(["a man", "a woman"]) is None  # both, across captions
    assert coco.caption_gender(["a manhole", "womanly"]) is None  # whole tokens only
    assert coco.caption_gender(["the man's hat"]) == "man"
    assert coco.caption_gender(["a cat"], male_words=["cat"], female_words=["dog"]) == "man"


def test_word_lists_are_the_cited_ones():
    assert len(coco.MALE_WORDS) == 27 and len(coco.FEMALE_WORDS) == 23
    assert not set(coco.MALE_WORDS) & set(coco.FEMALE_WORDS)
    assert {"man", "boys", "he", "cowboy"} <= set(coco.MALE_WORDS)
    assert {"woman", "girls", "she", "pregnant"} <= set(coco.FEMALE_WORDS)


def test_category_slug():
    assert coco.category_slug("teddy bear") == "teddy_bear"
    assert coco.category_slug("Hair Drier") == "hair_drier"
    with pytest.raises(ValueError, match="empty label name"):
        coco.category_slug(" - ")


def test_coco_annotations_exact_table(coco_files):
    table = coco.coco_annotations(*coco_files, seed=0)
    assert list(table.columns) == ["image_id", "split", "gender", "file_name", "label_bicycle", "label_teddy_bear"]
    train = table[table["split"] == "train"]
    assert train["image_id"].tolist() == ["1", "2", "5"]
    assert train["gender"].tolist() == ["man", "woman", "man"]
    assert train[["label_bicycle", "label_teddy_bear"]].to_numpy().tolist() == [[1, 0], [0, 1], [1, 1]]
    assert train["file_name"].tolist()[0] == "COCO_train2014_000000000001.jpg"
    # val2014: kept 101, 102, 103, 105 (sorted); the first n // 2 of the seeded permutation are val.
    kept = ["101", "102", "103", "105"]
    order = np.random.default_rng(0).permutation(4)
    expected_val = [kept[i] for i in sorted(order[:2])]
    expected_test = [kept[i] for i in sorted(order[2:])]
    assert table.loc[table["split"] == "val", "image_id"].tolist() == expected_val
    assert table.loc[table["split"] == "test", "image_id"].tolist() == expected_test
    by_id = table.set_index("image_id")
    assert by_id.loc[kept, "gender"].tolist() == ["woman", "man", "woman", "man"]
    assert by_id.loc[kept, ["label_bicycle", "label_teddy_bear"]].to_numpy().tolist() == [[1, 0], [1, 0], [0, 1], [0, 1]]
    assert table["label_bicycle"].dtype == np.int8
    # Another seed cuts val2014 differently; the train rows do not move.
    other = coco.coco_annotations(*coco_files, seed=3)
    assert other[other["split"] == "train"].equals(train)


def test_options_keep_person_and_unlabelled(coco_files):
    table = coco.coco_annotations(*coco_files, seed=0, exclude_categories=(), drop_unlabelled=False)
    assert [c for c in table.columns if c.startswith("label_")] == ["label_person", "label_bicycle", "label_teddy_bear"]
    train = table[table["split"] == "train"].set_index("image_id")
    assert train.index.tolist() == ["1", "2", "5", "6", "7"]
    assert train.loc["7", ["label_person", "label_bicycle", "label_teddy_bear"]].tolist() == [0, 0, 0]


def test_write_and_read_back(coco_files, tmp_path):
    table = coco.coco_annotations(*coco_files, seed=0)
    path = coco.write_annotations(table, tmp_path / "out" / "ANN.csv")
    back = read_annotations(path)
    assert back["image_id"].tolist() == table["image_id"].tolist()
    assert back[["label_bicycle", "label_teddy_bear"]].equals(table[["label_bicycle", "label_teddy_bear"]])


def test_bad_inputs_name_the_file(coco_files, tmp_path):
    instances, captions = coco_files
    with pytest.raises(ValueError, match=r"expected a mapping with the keys \['train2014', 'val2014'\]"):
        coco.coco_annotations({"train2014": instances["train2014"]}, captions, seed=0)
    swapped = {"train2014": captions["train2014"], "val2014": instances["val2014"]}
    with pytest.raises(ValueError, match=r"captions_train2014.json: key\(s\) \['categories'\] missing"):
        coco.coco_annotations(swapped, captions, seed=0)
    crossed = {"train2014": captions["val2014"], "val2014": captions["val2014"]}
    with pytest.raises(ValueError, match=r"captions_val2014.json: 6 captioned image\(s\) not in .*instances_train2014"):
        coco.coco_annotations(instances, crossed, seed=0)
    missing = dict(instances, val2014=tmp_path / "nowhere.json")
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        coco.coco_annotations(missing, captions, seed=0)
    (tmp_path / "broken.json").write_text("{", encoding="utf-8")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        coco.coco_annotations(dict(instances, train2014=tmp_path / "broken.json"), captions, seed=0)
    with pytest.raises(ValueError, match="words in both gender lists"):
        coco.coco_annotations(instances, captions, seed=0, male_words=["man"], female_words=["man"])


def planted_coco(folder: Path, n: int, seed: int) -> tuple[dict, dict]:
    """A larger synthetic COCO whose bicycle label leans man and teddy bear woman."""
    rng = np.random.default_rng(seed)
    out: dict[str, tuple] = {"instances": {}, "captions": {}}
    for split, offset in (("train2014", 0), ("val2014", 100_000)):
        images = {}
        for i in range(n):
            woman = bool(rng.random() < 0.5)
            cats = [1]
            if rng.random() < (0.2 if woman else 0.7):
                cats.append(2)
            if rng.random() < (0.7 if woman else 0.2):
                cats.append(88)
            images[offset + i + 1] = ([f"a {'woman' if woman else 'man'} in a room"], cats)
        inst, caps = write_coco(folder, split, images)
        out["instances"][split], out["captions"][split] = inst, caps
    return out["instances"], out["captions"]


def test_leakage_report_on_the_coco_table(tmp_path):
    instances, captions = planted_coco(tmp_path, 400, seed=1)
    table = coco.coco_annotations(instances, captions, seed=0)
    assert set(table["split"]) == {"train", "val", "test"}
    report = leakage_report(table, attacker="logistic", rounds=2, seed=0, sizes={"train": 100, "val": 40, "test": 40},
                            flip_grid=(0.0, 0.5))
    assert report.attribute_values == ("man", "woman")
    assert report.labels == ("bicycle", "teddy_bear")
    # Two labels each shifted by 0.5 between genders: far above chance, and the flipped labels leak nothing.
    assert report.lambda_D.mean > 0.7
    assert abs(report.natural_leakage.set_index("p").loc[0.5, "leakage_mean"] - 0.5) < 0.1


# ----------------------------------------------------------------------------------------------------
# The archive


def make_archive(path: Path, payload: str = "x", extra: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        members = {m: json.dumps({"name": n, "payload": payload}) for n, m in coco.ARCHIVE_MEMBERS.items()}
        for member, text in {**members, **(extra or {})}.items():
            zf.writestr(zipfile.ZipInfo(member, date_time=(2014, 1, 1, 0, 0, 0)), text)  # same bytes each time
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fetch_records_the_digest_then_checks_it(tmp_path):
    source = make_archive(tmp_path / "src" / "annotations.zip", extra={"../../evil.json": "{}", "/abs.json": "{}"})
    lock, dest = tmp_path / "config" / "data.lock", tmp_path / "data" / "coco"
    paths = coco.fetch_coco_annotations(dest, lock_path=lock, url=source.as_uri(), progress=False)
    assert sorted(paths) == sorted([*coco.ARCHIVE_MEMBERS, "archive"])
    for name in coco.ARCHIVE_MEMBERS:
        assert paths[name] == dest / f"{name}.json"
        assert json.loads(paths[name].read_text())["name"] == name
    # Only the four named members are written, under names of our own: nothing escapes dest.
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        [f"{n}.json" for n in coco.ARCHIVE_MEMBERS]
        + ["annotations_trainval2014.zip", "annotations_trainval2014.zip.digest.json"])
    assert not (tmp_path / "evil.json").exists() and not Path("/abs.json").exists()
    entry = coco.read_data_lock(lock)[coco.LOCK_NAME]
    assert entry == {"url": source.as_uri(), "sha256": sha256(source)}
    assert lock.read_text().startswith("# Full sha256 of every data archive")

    # A later fetch with the entry uses the present, verified archive (the source may be gone).
    source.unlink()
    coco.fetch_coco_annotations(dest, lock_path=lock, url=source.as_uri(), progress=False)

    # A present archive that does not verify is fetched again and must verify: a changed source is refused.
    (dest / "annotations_trainval2014.zip").write_bytes(b"corrupt")
    make_archive(source, payload="changed")
    with pytest.raises(HashMismatchError, match="does not verify"):
        coco.fetch_coco_annotations(dest, lock_path=lock, url=source.as_uri(), progress=False)
    assert (dest / "annotations_trainval2014.zip").read_bytes() == b"corrupt"

    # The original bytes from a mirror URL verify against the recorded digest.
    mirror = make_archive(tmp_path / "mirror" / "annotations.zip", extra={"../../evil.json": "{}", "/abs.json": "{}"})
    assert sha256(mirror) == entry["sha256"]
    coco.fetch_coco_annotations(dest, lock_path=lock, url=mirror.as_uri(), progress=False)
    assert sha256(dest / "annotations_trainval2014.zip") == entry["sha256"]
    assert coco.read_data_lock(lock)[coco.LOCK_NAME] == entry  # the entry keeps the first URL


def test_fetch_refuses_http_and_an_archive_without_the_members(tmp_path):
    with pytest.raises(ValueError, match="only https:// or file://"):
        coco.fetch_coco_annotations(tmp_path, lock_path=tmp_path / "data.lock",
                                    url="http://images.cocodataset.org/annotations/annotations_trainval2014.zip")
    other = tmp_path / "src" / "other.zip"
    other.parent.mkdir()
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("annotations/instances_train2017.json", "{}")
    with pytest.raises(ValueError, match="no member 'annotations/instances_train2014.json'"):
        coco.fetch_coco_annotations(tmp_path / "dest", lock_path=tmp_path / "data.lock", url=other.as_uri(),
                                    progress=False)


def test_read_data_lock_errors(tmp_path):
    lock = tmp_path / "data.lock"
    assert coco.read_data_lock(lock) == {}
    lock.write_text("coco2014_annotations: {url: x, sha256: abc}\n")
    with pytest.raises(ValueError, match="sha256 'abc' is not 64 lower-case hex digits"):
        coco.read_data_lock(lock)
    lock.write_text("coco2014_annotations: {url: x}\n")
    with pytest.raises(ValueError, match=r"expected exactly the keys \['sha256', 'url'\]"):
        coco.read_data_lock(lock)


def test_constants_document_the_urls():
    assert coco.COCO_ANNOTATIONS_URL.startswith("https://")
    assert coco.COCO_ANNOTATIONS_S3_URL.startswith("https://s3.amazonaws.com/images.cocodataset.org/")
    assert coco.COCO_ANNOTATIONS_URL.endswith("annotations_trainval2014.zip")
