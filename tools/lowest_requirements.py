"""Print the lowest versions that pyproject.toml allows, one ``name[extras]==version`` a line.

`make test-min` installs them over the locked test tools. Covered: every runtime dependency
and every extra's, except the tooling extras (test, dev), which stay as locked. Each lower
bound (``>=``) becomes a pin; a requirement with no lower bound is an error, since nothing
could then be tested at the low end.
"""

from __future__ import annotations

import sys
from pathlib import Path

from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest brings tomli on 3.10
    import tomli as tomllib

TOOLING_EXTRAS = {"test", "dev"}


def lowest(requirements: list[str]) -> list[str]:
    """One pin per distribution, at its lower bound, with the union of the extras asked for."""
    bounds: dict[str, str] = {}
    extras: dict[str, set[str]] = {}
    for text in requirements:
        req = Requirement(text)
        floor = [s.version for s in req.specifier if s.operator in (">=", "==", "~=")]
        if not floor:
            raise SystemExit(f"{text!r} has no lower bound to test")
        name = req.name.lower()
        if bounds.setdefault(name, floor[0]) != floor[0]:
            raise SystemExit(f"{name} has two lower bounds: {bounds[name]} and {floor[0]}")
        extras.setdefault(name, set()).update(req.extras)
    return [
        f"{name}[{','.join(sorted(extras[name]))}]=={v}" if extras[name] else f"{name}=={v}"
        for name, v in sorted(bounds.items())
    ]


def main() -> None:
    """Print the pins for the pyproject.toml beside this folder."""
    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    reqs = list(project["project"]["dependencies"])
    for extra, items in project["project"]["optional-dependencies"].items():
        if extra not in TOOLING_EXTRAS:
            reqs.extend(items)
    print("\n".join(lowest(reqs)))


if __name__ == "__main__":
    main()
