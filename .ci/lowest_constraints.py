"""Print pip constraints that pin every direct dependency of repae to the lowest version its floor allows.

Reads pyproject.toml's ``dependencies`` and every extra in ``optional-dependencies``; each ``name>=X`` becomes
``name==X`` (pip's equivalent of ``uv pip install --resolution lowest-direct``: the direct dependencies at their floors,
everything they pull in at the newest version that fits). A requirement without a version is left free. torch and
torchvision are not taken from their floors: they are held at the versions given with ``--hold name==version`` (the
build installed in the main CI venv), because an older torch is a multi-GB download this CI does not make. A held
package that is not a direct dependency (torchvision: timm and open_clip require it, repae imports none of it) is
pinned all the same, so that pip takes the build that matches the held torch.

Usage: python .ci/lowest_constraints.py [--hold torch==2.14.1 ...] > constraints.txt
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

_REQ = re.compile(r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(?:>=\s*(?P<floor>[0-9][^,;\s]*))?\s*$")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def floors(pyproject: Path) -> dict[str, str | None]:
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    found: dict[str, str | None] = {}
    for req in reqs:
        m = _REQ.match(req)
        if not m:  # a `<`, `==`, `~=` or marker would need thought here: refuse rather than guess
            sys.exit(f"lowest_constraints: cannot read the floor of {req!r}: write it as 'name>=version' or 'name'")
        name, floor = normalize(m["name"]), m["floor"]
        if found.get(name) not in (None, floor):
            sys.exit(f"lowest_constraints: {name} has two different floors ({found[name]} and {floor})")
        found[name] = floor or found.get(name)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", type=Path, default=Path(__file__).resolve().parent.parent / "pyproject.toml")
    parser.add_argument("--hold", action="append", default=[], metavar="NAME==VERSION",
                        help="pin this package at this version instead of its floor (torch, torchvision)")
    args = parser.parse_args()
    held = {}
    for spec in args.hold:
        name, sep, version = spec.partition("==")
        if not sep or not version:
            sys.exit(f"lowest_constraints: --hold takes NAME==VERSION, not {spec!r}")
        held[normalize(name)] = version
    pins = {name: floor for name, floor in floors(args.pyproject).items() if floor is not None}
    pins.update(held)
    for name, version in sorted(pins.items()):
        print(f"{name}=={version}")


if __name__ == "__main__":
    main()
