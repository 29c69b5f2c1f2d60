# Copyright © 2026 mtp_splitk contributors

"""A wheel holds every package of the source tree (pyproject lists them by hand)."""

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_lists_every_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "mtp_splitk").rglob("__init__.py")
    }
    assert found <= listed, f"missing from pyproject's packages: {sorted(found - listed)}"
    assert config["package-dir"]["mtp_splitk.kernels"] == "kernels"


def test_package_data_covers_the_shipped_files():
    """Non-Python files under mtp_splitk/ (tuning tables, the demo's MTP head)
    install with the package: each matches a package-data pattern."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = config["package-data"]["mtp_splitk"]
    package = ROOT / "mtp_splitk"
    shipped = [
        p.relative_to(package) for p in package.rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    ]
    assert any(p.suffix == ".safetensors" for p in shipped)
    for path in shipped:
        assert any(path.match(pattern) for pattern in patterns), path
