"""The demo section's params (``bd demo``), apart from the generator so that the sample sheet
(:func:`bd.cohort.samples.demo_slides`) reads the same defaults without an import cycle."""

from __future__ import annotations

from dataclasses import dataclass

from bd.errors import ConfigError
from bd.params import check, param


@dataclass
class DemoParams:
    """The synthetic demo cohort in the BCNB layout (`bd demo`)."""

    enabled: bool = param(True, description="write the demo cohort (the cohort section then points at it)")
    out_dir: str = param("results/demo", description="folder of the demo cohort")
    patients: int = param(80, minimum=4, description="patients (one slide each)")
    test_patients: int | None = param(
        None, minimum=1, description="test split size (the rest in BCNB's 630:210 train:val ratio); null: BCNB's ratio")
    seed: int = param(0, description="seed of the cohort")
    slide_size: int = param(4096, minimum=512, description="slide side in px at level 0")
    mpp: float = param(0.5, exclusive_minimum=0, description="level-0 microns per pixel of the slides")
    flat_jpeg_fraction: float = param(0.1, minimum=0, maximum=1,
                                      description="share of the slides written as flat JPEGs (BCNB's format)")
    annotations: bool = param(True, description="write tumour annotation polygons")
    slide_signal: float = param(1.5, minimum=0,
                                description="N+ vs N0 shift of the slides' hidden tumour burden, in SD units")
    jpeg_quality: int = param(85, minimum=1, maximum=100, description="JPEG quality of the slides' tiles")

    def __post_init__(self) -> None:
        check(self)
        if self.test_patients is not None and not self.test_patients < self.patients - 1:
            raise ConfigError(f"demo.test_patients: {self.test_patients} leaves no training and validation "
                              f"patients of demo.patients ({self.patients})")
