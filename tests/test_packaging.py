"""The package list in pyproject.toml names every package of the tree (a wheel built from
it carries them all; CI's .ci/wheel-check imports every module from such a wheel)."""

import pathlib

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_every_package_of_the_tree_is_in_the_wheel():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    tree = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "kvwire").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert tree - listed == set(), "packages missing from pyproject.toml"
    assert listed - tree == set(config["package-dir"]), "listed packages that are not in the tree"
