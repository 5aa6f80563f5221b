"""`make wheels`: build the four distributions and install them as a user would.

reapkit and each plugins/* directory are built (sdist, then the wheel from the sdist) into
dist/; the wheels are installed into a new venv outside the checkout, with their dependencies
from the package index; that venv imports every package, runs `reapkit --version`, and
`reapkit plugins --json` must list each plugin as loaded from its own distribution.
Exits non-zero, saying what failed, otherwise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECTS = [ROOT, *sorted(p.parent for p in ROOT.glob("plugins/*/pyproject.toml"))]


def run(*argv: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        sys.exit(f"make wheels: {' '.join(map(str, argv))} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default="python3", help="the Python of the clean venv")
    parser.add_argument("--dist", type=Path, default=ROOT / "dist")
    args = parser.parse_args()
    shutil.rmtree(args.dist, ignore_errors=True)
    plugins: dict[str, str] = {}  # entry-point name -> distribution
    for project in PROJECTS:
        with open(project / "pyproject.toml", "rb") as f:
            meta = tomllib.load(f)["project"]
        for name in meta.get("entry-points", {}).get("reapkit.plugins", {}):
            plugins[name] = meta["name"]
        run(sys.executable, "-m", "build", "--outdir", args.dist, project)
        print(f"built {meta['name']}")
    wheels = sorted(args.dist.glob("*.whl"))
    assert len(wheels) == len(PROJECTS), wheels
    with tempfile.TemporaryDirectory(prefix="reapkit-wheels-") as tmp:
        venv = Path(tmp) / "venv"
        run(args.python, "-m", "venv", venv)
        bin_ = venv / "bin"
        run(bin_ / "python", "-m", "pip", "install", "--quiet", *wheels)
        modules = ["reapkit", "reapkit.asyncio", "reapkit.lowlevel", "reapkit.testing"]
        modules += [p.name.replace("-", "_") for p in PROJECTS[1:]]
        # From the venv's directory: nothing of the checkout on the path.
        run(bin_ / "python", "-c", f"import {', '.join(modules)}", cwd=venv)
        print(run(bin_ / "reapkit", "--version", cwd=venv).strip(), "from its wheel")
        listed = {p["name"]: p for p in json.loads(run(bin_ / "reapkit", "plugins", "--json"))}
        for name, dist in plugins.items():
            got = listed.get(name)
            if got is None or got["error"] is not None or got["source"] != dist:
                sys.exit(f"make wheels: plugin {name} did not load from {dist}: {got}")
        print(f"installed {len(wheels)} wheels in a clean venv: plugins {', '.join(plugins)}")


if __name__ == "__main__":
    main()
