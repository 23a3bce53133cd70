"""requirements/lock.txt is exactly what pyproject.toml resolves to (dependencies + the `test` and `sweeps` extras).

The closure is walked offline from the installed distributions' Requires-Dist, with markers evaluated for
this machine and the extras each requirement asks for, so a package nothing needs, a missing one, or a pin
that differs from what the tests ran with all fail here.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = Path(__file__).resolve().parents[1]
# Installers, not dependencies: a venv has them whether or not anything asks for them.
BUILD_TOOLS = {"pip", "setuptools", "wheel"}


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"lock.txt line {line!r} is not pinned with =="
            pins[canonicalize_name(name)] = version.strip()
    return pins


def resolved_closure() -> dict[str, str]:
    """Installed version of every distribution that the project's requirements pull in, transitively."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pending = [(Requirement(text), "kd-lightning") for text in
               [*project["dependencies"], *project["optional-dependencies"]["test"],
                *project["optional-dependencies"]["sweeps"]]]
    walked: set[tuple[str, frozenset[str]]] = set()
    versions: dict[str, str] = {}
    while pending:
        requirement, required_by = pending.pop()
        name, extras = canonicalize_name(requirement.name), frozenset(requirement.extras)
        if (name, extras) in walked:
            continue
        walked.add((name, extras))
        try:
            distribution = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"{requirement} (required by {required_by}) is not installed; run scripts/setup.sh")
        versions[name] = distribution.version
        for text in distribution.requires or []:
            dependency = Requirement(text)
            # A marker such as `extra == "dev"` holds only for the extras this requirement asked for.
            if dependency.marker is None or any(dependency.marker.evaluate({"extra": extra})
                                                for extra in (extras or {""})):
                pending.append((dependency, name))
    return versions


def test_lock_is_exactly_the_resolved_requirements():
    pins, closure = lock_pins(), resolved_closure()
    unneeded = sorted(set(pins) - set(closure) - BUILD_TOOLS)
    missing = sorted(set(closure) - set(pins) - BUILD_TOOLS)
    assert not unneeded, f"lock.txt pins packages nothing in pyproject.toml requires: {unneeded}"
    assert not missing, f"lock.txt lacks packages pyproject.toml pulls in: {missing}"
    drifted = {name: (pins[name], closure[name]) for name in pins if name in closure and pins[name] != closure[name]}
    assert not drifted, f"lock.txt pin vs installed version: {drifted}; pin what the tests ran with"
