"""The distribution lists every package of the source tree.

pyproject.toml names its packages one by one (services/ imports as aisrl.services), so a new
subpackage that is not listed works in the editable install the tests use and is missing from every
built wheel and image (`aisrl.models.quant` was: the compose smoke test caught it, after 20 minutes).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _source_packages() -> set[str]:
    found = set()
    for top, name in (("aisrl", "aisrl"), ("services", "aisrl.services")):
        for init in (ROOT / top).rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name, *rel)))
    return found


def test_every_source_package_is_in_the_distribution():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    assert _source_packages() - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert listed - _source_packages() == set(), "pyproject.toml lists packages that do not exist"
