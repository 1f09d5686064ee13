"""The repository's top level is the design's flat layout, and the wheel's package list misses no subpackage."""

from __future__ import annotations

from pathlib import Path

import pytest

import hf_fedlora
from hf_fedlora import hub

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_is_the_flat_layout_of_the_design():
    for name in ["pyproject.toml", "README.md", "hf_fedlora", "examples", "model_cards", "tests", "benchmarks"]:
        assert (ROOT / name).exists(), name
    assert not (ROOT / "src").exists(), "the package moved to the top-level hf_fedlora/ (flat layout, as TRL/Opacus)"
    assert (ROOT / "hf_fedlora" / "__init__.py").is_file()


def test_every_subpackage_is_in_the_wheel_and_every_listed_package_exists():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    remapped = setuptools.get("package-dir", {})

    def folder(package: str) -> Path:
        return ROOT / remapped[package] if package in remapped else ROOT / package.replace(".", "/")

    for package in listed:
        assert (folder(package) / "__init__.py").is_file(), f"{package} is listed but has no __init__.py"
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "hf_fedlora").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    missing = on_disk - listed
    assert not missing, f"subpackages left out of pyproject's packages (the wheel would lack them): {missing}"


def test_model_card_template_resolves_from_the_package_and_from_the_repository():
    from_package = hub._template_text()
    fallback = Path(hub.__file__).resolve().parents[1] / "model_cards" / hub.TEMPLATE_NAME
    assert fallback.is_file()
    assert fallback.read_text(encoding="utf-8") == from_package
    assert Path(hf_fedlora.__file__).resolve().parent == ROOT / "hf_fedlora"
