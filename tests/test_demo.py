from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from sbssl.demo import IMAGE_SIZE, generate_demo_stimuli


def _digest(paths):
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def test_demo_stimuli_layout_and_determinism(tmp_path):
    first = generate_demo_stimuli(tmp_path / "a", images_per_concept=3, seed=7)
    again = generate_demo_stimuli(tmp_path / "b", images_per_concept=3, seed=7)
    other = generate_demo_stimuli(tmp_path / "c", images_per_concept=3, seed=8)
    folders = sorted({p.parent.relative_to(tmp_path / "a").as_posix() for p in first})
    assert folders == [
        "attributes/pleasant", "attributes/unpleasant", "control/first", "control/second",
        "intersectional/cool-dots", "intersectional/warm-dots", "targets/cool", "targets/warm",
    ]
    assert len(first) == 8 * 3
    assert _digest(first) == _digest(again)
    assert _digest(first) != _digest(other)
    assert Image.open(first[0]).size == (IMAGE_SIZE, IMAGE_SIZE)


def test_control_second_is_the_mirror_of_first(tmp_path):
    generate_demo_stimuli(tmp_path, images_per_concept=2)
    for name in ("00.png", "01.png"):
        first = np.asarray(Image.open(tmp_path / "control/first" / name))
        second = np.asarray(Image.open(tmp_path / "control/second" / name))
        assert np.array_equal(first[:, ::-1], second)


def test_planted_colours_differ_between_warm_and_cool(tmp_path):
    generate_demo_stimuli(tmp_path, images_per_concept=4)

    def mean_rgb(folder):
        return np.mean([np.asarray(Image.open(p), dtype=float).mean(axis=(0, 1)) for p in (tmp_path / folder).glob("*.png")], axis=0)

    warm, cool = mean_rgb("targets/warm"), mean_rgb("targets/cool")
    assert warm[0] > warm[2] and cool[2] > cool[0]  # red-dominant vs blue-dominant


def test_too_few_images_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="images_per_concept"):
        generate_demo_stimuli(tmp_path, images_per_concept=1)
