"""The package: its declared dependencies, and a wheel installed outside the checkout.

The wheel test avoids installing TensorFlow (minutes, GBs) into its fresh venv:

1. the wheel is built from a copy of the package files in a temporary directory
   (`pip wheel --no-build-isolation --no-index`, with the setuptools of the test's own
   environment, so no network is needed);
2. the fresh venv is made with this interpreter's `python -m venv --without-pip`, and one
   `.pth` file in its site-packages lists this interpreter's import path minus the
   checkout: the dependencies are importable there, sokd_tf is not (a `.pth` line only
   adds a directory; the `.pth` files inside it, e.g. an editable install of the checkout,
   are not processed);
3. `pip install --dry-run --no-index --report` of the wheel's `Requires-Dist` lines
   against that venv resolves offline only if every declared dependency is already
   satisfied there (a missing one fails with "No matching distribution"), and the report
   must have nothing to install;
4. this interpreter's pip installs the wheel alone (`--python VENV_PYTHON --no-deps
   --force-reinstall`: an editable install of the checkout in the exposed site-packages
   would otherwise count as "already installed"), which writes the `sokd-tf` script; the
   checks run it and import sokd_tf with no PYTHONPATH, from a directory outside the
   checkout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (CI runs 3.11)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_FILES = ("pyproject.toml", "README.md", "LICENSE", "sokd_tf", "pipelines")


def _requirement_lines(path):
    with open(path) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith(("#", "-"))]


def _normalized(requirement: str) -> str:
    return re.sub(r"\s+", "", requirement).lower().replace("_", "-")


def test_pyproject_declares_exactly_the_lines_of_requirements_txt():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["test"]
    requirements = _requirement_lines(os.path.join(REPO, "requirements.txt"))
    assert sorted(map(_normalized, declared)) == sorted(map(_normalized, requirements))
    assert project["scripts"] == {"sokd-tf": "pipelines.cli:main"}
    assert project["license"] == "Apache-2.0"
    assert not any(_normalized(r).startswith("torch") for r in declared), "torch is [bench] only"


def _run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def _dependency_path() -> list[str]:
    """This interpreter's import path without the checkout and the standard library."""
    stdlib = sysconfig.get_paths()["stdlib"]  # the base interpreter's, shared by every venv
    keep = []
    for entry in sys.path:
        path = os.path.abspath(entry) if entry else ""
        if (not path or not os.path.isdir(path) or os.path.commonpath([path, stdlib]) == stdlib
                or path == REPO):  # a venv inside the checkout (.venv/) is kept
            continue
        if path not in keep:
            keep.append(path)
    return keep


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_gives_the_library_and_the_sokd_tf_command(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in PACKAGE_FILES:
        origin = os.path.join(REPO, name)
        if os.path.isdir(origin):
            shutil.copytree(origin, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(origin, source / name)
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(dist),
          str(source)])
    (wheel,) = dist.glob("sokd_tf-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "pipelines/cli.py" in names and "sokd_tf/__main__.py" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: Apache-2.0" in metadata
    assert "Requires-Dist: tensorflow<2.22,>=2.21" in metadata
    assert "sokd-tf = pipelines.cli:main" in entry_points

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = str(venv / "bin" / "python")
    site_packages = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
                         ).stdout.strip()
    with open(os.path.join(site_packages, "sokd_tf_dependencies.pth"), "w") as f:
        f.write("\n".join(_dependency_path()) + "\n")

    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert any(r.startswith("pyyaml") for r in requires)
    report = tmp_path / "report.json"
    _run([*pip, "--python", python, "install", "--dry-run", "--no-index", "-q", "--report",
          str(report), *requires])
    assert json.loads(report.read_text())["install"] == [], "every dependency is already there"
    _run([*pip, "--python", python, "install", "--no-deps", "--no-index", "--force-reinstall",
          "-q", str(wheel)])

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "TF_CPP_MIN_LOG_LEVEL")}
    command = str(venv / "bin" / "sokd-tf")
    helped = _run([command, "run", "--help"], cwd=outside, env=env)
    assert re.search(r"^  --temperature=4\.0\n      T of SOKD and KD \(KL terms scaled by T\^2\)\.$",
                     helped.stdout, flags=re.M), helped.stdout
    assert helped.stdout.startswith("usage: sokd-tf run --workdir=...")
    assert helped.stderr == ""
    missing = subprocess.run([command, "run"], cwd=outside, env=env, capture_output=True,
                             text=True, timeout=600)
    assert (missing.returncode, missing.stderr) == (2, "error: --workdir is required\n")
    imported = _run([python, "-c", "import pipelines.cli, sokd_tf; print(sokd_tf.__file__); "
                     "print(pipelines.cli.__file__)"], cwd=outside, env=env)
    for path in imported.stdout.split():
        assert path.startswith(site_packages), path
