"""bd qc: slides whose patches are upsampled are counted in the cohort checks (issue 13)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from bd.workflow.qc import cohort_checks, slide_errors, upsampled_slides
from bd.features.store import write_store


def test_upsampled_slides_are_a_cohort_check_row(tmp_path: Path) -> None:
    results = tmp_path / "results"
    rows = []
    for sid, mpp in (("fine", 0.5), ("slightly", 0.6), ("coarse", 1.0)):
        slide = tmp_path / f"{sid}.jpg"
        slide.write_bytes(b"x")
        rows.append((sid, f"P{sid}", str(slide)))
        write_store(results / "features" / f"{sid}.zarr", np.zeros((1, 4)), np.zeros((1, 2), np.int64),
                    {"slide_id": sid, "mpp": mpp, "target_mpp": 0.5})
    samples = pd.DataFrame(rows, columns=["slide_id", "patient_id", "path"])
    assert upsampled_slides(samples, results) == ["coarse"]  # 1.2x is within the 1.25x allowance
    checks = cohort_checks(samples, slide_errors(samples, results), {"cohort": {}}, ["coarse"]).set_index("check")
    assert checks.loc["slide_upsampled", "count"] == 1 and checks.loc["slide_upsampled", "examples"] == "coarse"
    assert checks.loc["slide_upsampled", "level"] == "warning"
