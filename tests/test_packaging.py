"""The dependency bounds that pyproject.toml states are the ones CI tests: `.ci/lower-bounds.txt` pins each to it."""

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
NOT_OURS = {"torchvision"}  # pinned in the file for clean-fid's sake


def _lower_bounds_in_pyproject() -> dict[str, Version]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    texts = project["dependencies"] + [text for extra in project["optional-dependencies"].values() for text in extra]
    bounds = {}
    for requirement in map(Requirement, texts):
        lowest = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        assert len(lowest) <= 1, requirement
        if lowest:
            bounds[requirement.name] = Version(lowest[0])
    return bounds


def _pins() -> dict[str, Version]:
    lines = (ROOT / ".ci" / "lower-bounds.txt").read_text().splitlines()
    pins = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    assert all(len(pin.specifier) == 1 and next(iter(pin.specifier)).operator == "==" for pin in pins), pins
    return {pin.name: Version(next(iter(pin.specifier)).version) for pin in pins}


def test_every_lower_bound_is_pinned_for_ci_and_nothing_else_is():
    bounds, pins = _lower_bounds_in_pyproject(), _pins()
    assert {name: version for name, version in pins.items() if name not in NOT_OURS} == bounds
    assert "torch" in bounds and "diffusers" in bounds
