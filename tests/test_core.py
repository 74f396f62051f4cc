"""Core contracts: parameter checking, atomic outputs, the CLI registry, patch grids."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from bd import cli
from bd.errors import BDError, ConfigError, StoreError
from bd.slides.grid import PatchGrid, load_grid, save_grid
from bd.io import atomic_path, write_json
from bd.params import build


@dataclasses.dataclass
class _Params:
    size: int = 256
    mpp: float = 0.5
    mode: Literal["fail", "skip"] = "fail"
    cap: int | None = None
    names: list[str] = dataclasses.field(default_factory=list)


def test_build_accepts_json_and_casts_int_to_float():
    p = build(_Params, '{"size": 128, "mpp": 1, "mode": "skip", "names": ["a"]}')
    assert (p.size, p.mpp, p.mode, p.names) == (128, 1.0, "skip", ["a"])
    assert isinstance(p.mpp, float)


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ('{"sise": 1}', "sise"),
        ('{"size": "big"}', "size"),
        ('{"size": true}', "size"),
        ('{"mode": "maybe"}', "mode"),
        ('{"cap": 1.5}', "cap"),
        ('{"names": "a"}', "names"),
    ],
)
def test_build_names_the_bad_key(value, key):
    with pytest.raises(ConfigError, match=f"'{key}"):
        build(_Params, value)


def test_build_reads_yaml_file(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("size: 64\ncap: 3\n")
    assert build(_Params, str(f)) == _Params(size=64, cap=3)
    with pytest.raises(ConfigError, match="neither a JSON object nor an existing file"):
        build(_Params, str(tmp_path / "missing.yaml"))


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []
    write_json(target, {"a": 1})
    assert target.read_text().strip() == '{\n  "a": 1\n}'


def test_atomic_path_replaces_directory_only_when_complete(tmp_path):
    target = tmp_path / "store.zarr"
    target.mkdir()
    (target / "old").write_text("old")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("new")
        assert (target / "old").exists()
    assert sorted(os.listdir(target)) == ["new"]


def test_unwritable_output_folder_is_a_clear_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permissions
            pytest.skip("running as a user that can write anywhere")
        with pytest.raises(BDError, match="not writable"):
            write_json(ro / "x.json", {})
    finally:
        ro.chmod(0o700)


def test_grid_roundtrip(tmp_path):
    grid = PatchGrid(
        coords=np.array([[0, 0], [512, 0]]), slide_id="s", slide_width=1000, slide_height=600,
        mpp=0.25, target_mpp=0.5, patch_size=256, patch_size_level0=512.0, read_level=1,
        read_downsample=2.0, read_size=256, meta={"tissue_threshold": 0.5},
    )
    back = load_grid(save_grid(grid, tmp_path / "g.npz"))
    assert back.attrs() == grid.attrs()
    np.testing.assert_array_equal(back.coords, grid.coords)
    (tmp_path / "bad.npz").write_text("nope")
    with pytest.raises(StoreError, match="bad.npz"):
        load_grid(tmp_path / "bad.npz")


def test_cli_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_cli_turns_bd_errors_into_exit_2(tmp_path, capsys):
    rc = cli.main(["samples", "--sheet", str(tmp_path / "missing.tsv"), "--out", str(tmp_path / "o.tsv")])
    assert rc == 2
    assert "missing.tsv" in capsys.readouterr().err


def test_output_folder_that_cannot_be_created_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(BDError, match="cannot create output folder"):
        write_json(blocker / "sub" / "x.json", {})


def _section_params():
    """The sections with a params dataclass (bd.params.SECTIONS) but training, whose config
    section lists only what the demo sets (an experiment adds its overrides)."""
    from bd.workflow.schema import section_params

    return {k: v for k, v in section_params().items() if k != "training"}


# The demo config's features differ from FeatureParams' defaults on purpose (small random encoder),
# and its demo.test_patients (30; the default None keeps BCNB's ratio for small test cohorts).
DEFAULTS_ARE_THE_CONFIG = {"segmentation", "tiling", "clinical", "split", "h5_features", "external"}


@pytest.mark.parametrize("section", sorted(_section_params()))
def test_config_yaml_lists_every_key_of_each_section(section):
    """config/config.yaml writes out every key of each stage section (the schema is generated from
    the same dataclass: tests/workflow/test_schema.py), at the dataclass's defaults where it says so."""
    import yaml

    root = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((root / "config" / "config.yaml").read_text())[section]
    cls = _section_params()[section]
    assert set(config) == {f.name for f in dataclasses.fields(cls)}
    params = build(cls, config)
    if section in DEFAULTS_ARE_THE_CONFIG:
        assert params == cls()
    if section == "demo":
        assert params.test_patients == 30 and dataclasses.replace(params, test_patients=None) == cls()
    if section == "features":
        assert params.random_weights and params.weights is None  # the demo runs offline
    if section == "evaluation":  # the figure rules' fallbacks (report.smk) are these defaults too
        assert params.figures == type(params.figures)()


def _whole_sections():
    from bd.workflow.schema import section_params

    return section_params()


@pytest.mark.parametrize("section", sorted(_whole_sections()))
def test_every_bd_command_accepts_its_whole_config_section(section):
    """config/README.md: each section passes whole to its command's --params (figures included)."""
    import json

    import yaml

    root = Path(__file__).resolve().parents[1]
    for name in ("config.yaml", "bcnb.yaml"):
        config = yaml.safe_load((root / "config" / name).read_text()) or {}
        if section in config:
            build(_whole_sections()[section], json.dumps(config[section]))


def test_yaml_1_1_floats_are_numbers():
    """``1e-4`` (no dot) is text to YAML 1.1 loaders; a float key takes it as a number."""
    import yaml

    value = yaml.safe_load("lr: 1e-4")["lr"]
    assert value == "1e-4"  # what PyYAML and Snakemake hand over
    assert build(_Params, {"mpp": value}).mpp == 1e-4
    with pytest.raises(ConfigError, match="'mpp'"):
        build(_Params, {"mpp": "fast"})
