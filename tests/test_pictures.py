"""Training sample grids (:func:`repae.train.observe.save_grid`): at least 512 px wide, small tiles scaled up by a
whole factor with nearest neighbour (each pixel a k x k block), one labelled row per class."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from repae.sampling import GRID_MIN_WIDTH
from repae.train.observe import save_grid


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _read(path) -> np.ndarray:
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.mode == "RGB"
        return np.asarray(picture)


def test_class_rows_are_labelled_and_tiles_scaled_up_exactly(tmp_path):
    images = _images(12)
    labels = [i % 3 for i in range(12)]  # as the engine asks: arange(count) % num_classes
    grid = _read(save_grid(images, tmp_path / "samples" / "step-0000010.png", labels=labels))
    k = 4  # 4 images of 32 px per class row: x4 makes them 512 px wide
    tile = 32 * k
    assert grid.shape[1] >= GRID_MIN_WIDTH and grid.shape[0] == 2 + 3 * (tile + 2)
    right = grid.shape[1]
    for c in range(3):
        top = 2 + c * (tile + 2)
        members = [i for i in range(12) if labels[i] == c]  # the class's images, in index order
        for column, i in enumerate(members):
            left = right - (4 - column) * (tile + 2)
            expected = images[i].permute(1, 2, 0).numpy().repeat(k, 0).repeat(k, 1)
            assert np.array_equal(grid[top:top + tile, left:left + tile], expected), (c, column)
        label = grid[top:top + tile, :right - 4 * (tile + 2)]
        assert label.shape[1] > 20 and (label < 128).any()  # "class c", in black on the white margin
    # the label text differs from row to row (class 0, 1, 2)
    margins = [grid[2 + c * (tile + 2):2 + c * (tile + 2) + tile, :right - 4 * (tile + 2)] for c in range(3)]
    assert not np.array_equal(margins[0], margins[1]) and not np.array_equal(margins[1], margins[2])


def test_unlabelled_grids_are_square_and_unlabelled(tmp_path):
    images = _images(9, size=16)
    grid = _read(save_grid(images, tmp_path / "grid.png"))
    k = -(-GRID_MIN_WIDTH // (3 * 16))  # 3 columns of 16 px: x11
    tile = 16 * k
    assert grid.shape[:2] == (2 + 3 * (tile + 2), 2 + 3 * (tile + 2))  # no label margin
    for i in range(9):
        top, left = 2 + (i // 3) * (tile + 2), 2 + (i % 3) * (tile + 2)
        expected = images[i].permute(1, 2, 0).numpy().repeat(k, 0).repeat(k, 1)
        assert np.array_equal(grid[top:top + tile, left:left + tile], expected), i
    # one class only (an unconditional model): the same square layout
    assert np.array_equal(_read(save_grid(images, tmp_path / "one.png", labels=[0] * 9)), grid)


def test_large_tiles_are_not_scaled(tmp_path):
    images = _images(2, size=300)
    grid = _read(save_grid(images, tmp_path / "big.png", nrow=2))
    assert grid.shape[:2] == (2 + 300 + 2, 2 + 2 * 302)
    assert np.array_equal(grid[2:302, 2:302], images[0].permute(1, 2, 0).numpy())


def test_labels_must_match_the_images(tmp_path):
    with pytest.raises(ValueError, match="3 labels for 2 images"):
        save_grid(_images(2), tmp_path / "x.png", labels=[0, 1, 2])
