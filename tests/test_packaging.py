"""Packaging: every import declared, the image's dependencies pinned, one version, typed."""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import istioctl_proxy

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "istioctl_proxy"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def declared() -> dict[str, Requirement]:
    reqs = (Requirement(r) for r in PYPROJECT["project"]["dependencies"])
    return {canonicalize_name(r.name): r for r in reqs}


def imported_modules() -> set[str]:
    """Absolute modules the package's own code imports, outside the standard library and itself."""
    found: set[str] = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module)
    return {m for m in found if m.split(".")[0] not in sys.stdlib_module_names and m.split(".")[0] != "istioctl_proxy"}


@functools.cache
def _owners() -> dict[Path, str]:
    """Every installed .py file and the distribution it belongs to."""
    owners: dict[Path, str] = {}
    for dist in md.distributions():
        for f in dist.files or ():
            if f.suffix == ".py":
                owners[Path(str(dist.locate_file(f))).resolve()] = canonicalize_name(dist.metadata["Name"])
    return owners


def distribution_of(module: str) -> str:
    """The installed distribution whose files hold `module` (a namespace like google.* has several owners)."""
    spec_file = importlib.import_module(module).__file__
    assert spec_file is not None, module
    target = Path(spec_file).resolve()
    assert target in _owners(), f"{module} ({target}) belongs to no installed distribution"
    return _owners()[target]


def test_every_imported_distribution_is_declared_and_every_declared_one_is_imported() -> None:
    owners = {m: distribution_of(m) for m in imported_modules()}
    undeclared = {m: d for m, d in owners.items() if d not in declared()}
    assert not undeclared, f"imported but not in [project] dependencies: {undeclared}"
    unused = set(declared()) - set(owners.values())
    assert not unused, f"declared but never imported by the package: {unused}"


def _closure() -> dict[str, str]:
    """Every distribution the installed package needs at run time (no extras), with its installed version."""
    needed: dict[str, str] = {}
    todo: list[tuple[str, frozenset[str]]] = [("istioctl-proxy", frozenset())]
    while todo:
        name, extras = todo.pop()
        for line in md.requires(name) or ():
            req = Requirement(line)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in extras or {""}):
                continue
            dep = canonicalize_name(req.name)
            if dep not in needed or req.extras:
                needed[dep] = md.version(dep)
                todo.append((dep, frozenset(req.extras)))
    return needed


def pins() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", version), f"not an exact pin: {line!r}"
            out[canonicalize_name(name)] = version
    return out


def test_constraints_pin_every_runtime_dependency() -> None:
    needed = _closure()
    assert {"grpcio", "lightkube", "httpx2", "h2", "protobuf"} <= set(needed)  # the walk really walks
    missing = sorted(set(needed) - set(pins()))
    assert not missing, f"constraints.txt does not pin {missing}: run scripts/lock"
    for name, req in declared().items():
        assert req.specifier.contains(pins()[name], prereleases=True), f"{name}=={pins()[name]} violates {req}"


def test_the_image_installs_with_the_constraints() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "constraints.txt" in dockerfile.split("COPY src/", 1)[0], "the build stage must copy constraints.txt"
    install = next(line for line in dockerfile.splitlines() if "-m pip" in line and " install " in line)
    assert "--constraint constraints.txt" in install


def test_one_version() -> None:
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "istioctl_proxy.__version__"}
    assert md.version("istioctl-proxy") == istioctl_proxy.__version__


def test_typed_marker_is_shipped() -> None:
    assert (SRC / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["istioctl_proxy"]
