"""envs/bd.yaml (the rules' conda environment) pins every dependency of pyproject.toml."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def env_pins() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "envs" / "bd.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    pins = {}
    for line in pip:
        if line.startswith("-e"):
            continue
        name, sep, version = line.partition("==")
        assert sep, f"envs/bd.yaml: {line!r} is not pinned with =="
        pins[canonicalize_name(name)] = version.strip()
    return pins


def test_env_pins_every_dependency_within_pyprojects_bounds():
    deps = [Requirement(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    pins = env_pins()
    missing = [d.name for d in deps if canonicalize_name(d.name) not in pins]
    assert not missing, f"envs/bd.yaml does not pin {missing}"
    for dep in deps:
        version = pins[canonicalize_name(dep.name)]
        assert dep.specifier.contains(version, prereleases=True), f"{dep.name}=={version} violates {dep}"
    assert set(pins) == {canonicalize_name(d.name) for d in deps}, "envs/bd.yaml pins a package pyproject does not need"


def test_env_is_python_311_and_installs_the_package():
    env = yaml.safe_load((ROOT / "envs" / "bd.yaml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert "-e ../" in pip


def test_env_torch_matches_the_makefile():
    makefile = (ROOT / "Makefile").read_text()
    torch = dict(re.findall(r"(torch|torchvision)==([\w.+]+)", re.search(r"^TORCH \?= (.*)$", makefile, re.M).group(1)))
    pins = env_pins()
    assert torch == {"torch": pins["torch"], "torchvision": pins["torchvision"]}
