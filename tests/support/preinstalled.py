"""Offer a fresh virtualenv the third-party packages this environment already installed.

The Dockerfile-equivalence test (tests/test_docker.py) runs docker/install.sh in a fresh
virtualenv. Unpacking and byte-compiling torch and the other pinned dependencies again
took most of its ~220 s and tests nothing of ours: `make install` already resolved and
installed the same pins from the same index. So before the install step runs, the test
links exactly the distributions that installing the project's runtime requirements would
bring in (followed through the installed metadata; the test and ray extras are not
followed) into a directory the fresh venv sees through a `.pth` file. pip then finds them
"already satisfied", while longserve itself and the model wheel are installed for real.
Nothing outside that closure is visible, so an import the runtime dependencies do not
declare still fails in the fresh venv as it would in the image.
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import Distribution, PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PTH_NAME = "_longserve_preinstalled.pth"


def runtime_closure(requirements: list[str]) -> list[Distribution]:
    """Installed distributions that `pip install` of `requirements` would install.

    Dependencies are followed through each installed distribution's `Requires-Dist`, with
    environment markers and requested extras honoured. A requirement that is not installed
    here, or whose installed version does not satisfy it, is left out (pip installs it).
    """
    found: dict[str, Distribution] = {}
    extras_done: dict[str, set[str]] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        extras = set(req.extras)
        if name in found and extras <= extras_done[name]:
            continue
        try:
            dist = found.get(name) or distribution(req.name)
        except PackageNotFoundError:
            continue
        if not req.specifier.contains(dist.version, prereleases=True):
            continue
        found[name] = dist
        extras_done.setdefault(name, set()).update(extras)
        for spec in dist.requires or []:
            dep = Requirement(spec)
            wanted = {""} | extras_done[name]
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in wanted):
                todo.append(dep)
    return list(found.values())


def link_distributions(dists: list[Distribution], target: Path) -> int:
    """Symlink each distribution's top-level files and folders into `target`.

    Returns how many entries were linked. Scripts outside site-packages (`../../bin/...`)
    and shared `__pycache__` folders are skipped.
    """
    target.mkdir(parents=True, exist_ok=True)
    count = 0
    for dist in dists:
        base = Path(dist.locate_file(""))
        for top in sorted({f.parts[0] for f in dist.files or []}):
            if top in ("..", "__pycache__") or (target / top).exists():
                continue
            (target / top).symlink_to(base / top)
            count += 1
    return count


def seed_venv(venv_python: Path, requirements: list[str], links: Path) -> int:
    """Make the distributions `requirements` need visible to the venv of `venv_python`.

    Returns the number of linked entries, or 0 (nothing done) when the venv's Python is
    not this interpreter's version, whose compiled packages would not load there.
    """
    import subprocess

    probe = "import sys, sysconfig; print(sys.version_info[:2], sysconfig.get_path('purelib'))"
    out = subprocess.run(
        [str(venv_python), "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    version, site_packages = re.fullmatch(r"(\(\d+, \d+\)) (.+)\n", out).groups()
    if version != str(sys.version_info[:2]):
        return 0
    count = link_distributions(runtime_closure(requirements), links)
    Path(site_packages, PTH_NAME).write_text(f"{links}\n")
    return count
