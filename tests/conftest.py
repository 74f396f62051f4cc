"""Shared fixtures: the real slide files in tests/data and small synthetic flat images."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(1 << 40))  # as bd.slides.slide, if cv2 loads first

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

DATA_DIR = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """tests/data: real slide files (see SOURCES.md), checked against SHA256SUMS."""
    return DATA_DIR


@pytest.fixture(scope="session")
def svs_path() -> Path:
    """Real Aperio SVS, 2220 x 2967, one level, MPP 0.499, 20x."""
    return DATA_DIR / "cmu-1-small-region.svs"


@pytest.fixture(scope="session")
def tiled_tiff_path() -> Path:
    """Generic tiled TIFF, 4 levels 300x250 -> 37x31, no usable MPP."""
    return DATA_DIR / "boxes.tiff"


def synthetic_rgb(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A deterministic H x W x 3 uint8 RGB image: smooth gradients, darker discs and a little noise."""
    rng = np.random.default_rng(seed)
    x = np.arange(width, dtype=np.float32)[None, :]
    y = np.arange(height, dtype=np.float32)[:, None]
    img = np.stack(np.broadcast_arrays(200 + 40 * np.sin(x / 97), 120 + 60 * np.cos(y / 53),
                                       180 + 25 * np.sin(x / 71) + 25 * np.cos(y / 41)), -1)
    discs = np.zeros((height, width), np.uint8)
    for _ in range(20):
        centre = (int(rng.integers(width)), int(rng.integers(height)))
        cv2.circle(discs, centre, int(rng.integers(20, 200)), 1, -1)
    img = img * (1 - 0.4 * discs[..., None]) + rng.integers(-4, 5, img.shape, dtype=np.int8)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def make_rgb() -> Callable[..., np.ndarray]:
    """Factory ``make_rgb(width, height, seed=0)`` of deterministic synthetic RGB images."""
    return synthetic_rgb


@pytest.fixture(scope="session")
def flat_rgb() -> np.ndarray:
    """A 3000 x 2000 (width x height) synthetic RGB image, as a BCNB-style flat slide's pixels."""
    return synthetic_rgb(3000, 2000)


@pytest.fixture(scope="session")
def flat_jpeg(tmp_path_factory: pytest.TempPathFactory, flat_rgb: np.ndarray) -> Path:
    """A BCNB-style flat JPEG (no MPP in its metadata), written by OpenCV."""
    path = tmp_path_factory.mktemp("flat") / "1.jpg"
    assert cv2.imwrite(str(path), cv2.cvtColor(flat_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    return path


@pytest.fixture
def one_torch_thread():
    """Run the test with one torch thread (timing- and order-stable training), then restore."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
