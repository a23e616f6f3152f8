"""The catalogue of association tests (config/tests.yaml): which stimulus folders each test compares.

File format::

    tests:
      - id: insect_flower            # slug: lower-case letters/digits joined by "_"
        title: "Insect-Flower"       # the published test name
        group: core                  # core | president | intersectional
        x: insect-flower/flower      # folders relative to the stimuli root (posix, no "..")
        y: insect-flower/insect
        a: valence/pleasant
        b: valence/unpleasant

X and Y are stated explicitly: several published tests order them against their title.

X and Y must differ, and so must A and B (the test would be degenerate). A target folder that
equals an attribute folder is allowed but warned about (:class:`CatalogueWarning`): the test would compare a
set with itself, which reads as a maximal bias at the smallest p-value. Repeated keys are refused.
"""

from __future__ import annotations

import itertools
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from sbssl.io import read_yaml

GROUPS = ("core", "president", "intersectional")
FIELDS = ("id", "title", "group", "x", "y", "a", "b")
SET_FIELDS = ("x", "y", "a", "b")
_SLUG = re.compile(r"^[a-z0-9]+(?:_[a-z0-9]+)*$")


class CatalogueWarning(UserWarning):
    """A catalogue entry that loads but is probably a mistake (a target folder that is also an attribute)."""


@dataclass(frozen=True)
class AssociationTestSpec:
    """One test: X, Y (target folders) and A, B (attribute folders), relative to the stimuli root."""

    id: str
    title: str
    group: str
    x: str
    y: str
    a: str
    b: str

    def folders(self) -> dict[str, str]:
        """{"X": x, "Y": y, "A": a, "B": b}."""
        return {name.upper(): getattr(self, name) for name in SET_FIELDS}


def overlapping_roles(spec: AssociationTestSpec) -> list[tuple[str, str]]:
    """Pairs of roles (from X, Y, A, B, in that order) that name the same folder, e.g. ``[("X", "A")]``."""
    return [(r1, r2) for (r1, f1), (r2, f2) in itertools.combinations(spec.folders().items(), 2) if f1 == f2]


def _check_folder(where: str, key: str, value: str) -> None:
    path = PurePosixPath(value)
    if path.is_absolute() or "\\" in value or ".." in path.parts or value != path.as_posix():
        raise ValueError(
            f"{where}: {key} must be a plain relative posix folder path (e.g. valence/pleasant), got {value!r}"
        )


def _parse_entry(where: str, entry: Any) -> AssociationTestSpec:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a mapping with keys {', '.join(FIELDS)}, got {type(entry).__name__}")
    unknown = sorted(set(map(str, entry)) - set(FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(FIELDS)}")
    missing = [key for key in FIELDS if key not in entry]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}")
    for key in FIELDS:
        if not isinstance(entry[key], str) or not entry[key].strip():
            raise ValueError(f"{where}: {key} must be a non-empty string, got {entry[key]!r}")
    if not _SLUG.match(entry["id"]):
        raise ValueError(f"{where}: id {entry['id']!r} is not a slug (lower-case letters/digits joined by '_')")
    if entry["group"] not in GROUPS:
        raise ValueError(f"{where}: group {entry['group']!r} is not one of {', '.join(GROUPS)}")
    for key in SET_FIELDS:
        _check_folder(where, key, entry[key])
    if entry["x"] == entry["y"]:
        raise ValueError(f"{where}: x and y are the same folder {entry['x']!r}")
    return AssociationTestSpec(**{key: entry[key] for key in FIELDS})


def _check_stimuli(spec: AssociationTestSpec, root: Path) -> None:
    """Each folder must hold files the stimuli scan reads (:func:`sbssl.stimuli.concept_folder_files`)."""
    from sbssl.stimuli import concept_folder_files  # here: stimuli imports pandas and Pillow

    for name, folder in spec.folders().items():
        try:
            files = concept_folder_files(root, folder)
        except (FileNotFoundError, ValueError) as exc:
            raise type(exc)(f"test {spec.id!r}: {name} folder {exc}") from None
        if not files:
            raise ValueError(
                f"test {spec.id!r}: {name} folder {folder!r} under {root} holds no image files (the scan reads "
                "regular, non-hidden files; symlinks leading out of the root are not followed): put the images "
                "in it or fix the path in the catalogue"
            )


def load_catalogue(
    path: str | os.PathLike[str], stimuli_root: str | os.PathLike[str] | None = None
) -> list[AssociationTestSpec]:
    """Read and validate a catalogue file; tests in file order.

    Raises FileNotFoundError for a missing file (or, with ``stimuli_root``, a missing folder) and
    ValueError for bad YAML or a repeated key, unknown or missing keys, a bad group or id, duplicate ids or
    titles, X == Y or A == B, and (with ``stimuli_root``) folders the stimuli scan would not read: empty (no
    regular image file), a symlink or below one, fewer than two levels deep (see :mod:`sbssl.stimuli`).
    Every message names the file and the test. A test whose target folder is also an attribute folder
    loads with a :class:`CatalogueWarning` (see :func:`overlapping_roles`).
    """
    path = Path(path)
    data = read_yaml(path, "catalogue")
    if not isinstance(data, dict) or set(data) != {"tests"}:
        keys = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"catalogue {path}: expected exactly one top-level key 'tests', got {keys}")
    entries = data["tests"]
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"catalogue {path}: 'tests' must be a non-empty list")
    specs: list[AssociationTestSpec] = []
    seen_ids: set[str] = set()
    seen_titles: set[str] = set()
    for i, entry in enumerate(entries):
        label = entry.get("id") if isinstance(entry, dict) else None
        where = f"catalogue {path}, test #{i + 1}" + (f" ({label!r})" if label else "")
        spec = _parse_entry(where, entry)
        if spec.id in seen_ids:
            raise ValueError(f"{where}: duplicate id {spec.id!r}")
        if spec.title in seen_titles:
            raise ValueError(f"{where}: duplicate title {spec.title!r}")
        seen_ids.add(spec.id)
        seen_titles.add(spec.title)
        specs.append(spec)
        overlaps = [(r1, r2) for r1, r2 in overlapping_roles(spec) if r1 in "XY" and r2 in "AB"]
        if overlaps:
            pairs = ", ".join(f"{r1} = {r2} = {spec.folders()[r1]!r}" for r1, r2 in overlaps)
            warnings.warn(
                f"{where}: target and attribute folders overlap ({pairs}); the test would compare a set with "
                "itself and report a bias at the smallest possible p-value: use distinct folders",
                CatalogueWarning,
                stacklevel=2,
            )
        if spec.a == spec.b:
            # kept loadable: the study goes on, and the tables flag the test as degenerate
            warnings.warn(
                f"{where}: a and b are the same folder {spec.a!r}; every s(w) is 0, so d is undefined and the "
                "test is reported as degenerate and left out of the counts",
                CatalogueWarning,
                stacklevel=2,
            )
    if stimuli_root is not None:
        root = Path(stimuli_root)
        if not root.is_dir():
            raise FileNotFoundError(f"stimuli root {root} not found")
        for spec in specs:
            _check_stimuli(spec, root)
    return specs
