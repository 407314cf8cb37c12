"""The wheel carries every module and every config, so that an installed grass-train needs no checkout."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# What the build leaves (build/, *.egg-info/) or what no build reads: the copy built from has none of it.
NOT_COPIED = shutil.ignore_patterns(
    ".git", ".venv*", "build", "*.egg-info", "__pycache__", ".*cache", "outputs", "multirun", "lightning_logs"
)


def test_the_wheel_holds_every_module_and_every_config(tmp_path):
    # Built from a copy of the checkout: setuptools writes build/ and *.egg-info/ beside pyproject.toml, and in the
    # checkout the egg-info would be read by the tests that read the package's metadata, in the other worker too.
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO, checkout, ignore=NOT_COPIED)
    command = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", tmp_path]
    subprocess.run([*command, str(checkout)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    modules = [*REPO.glob("lightning_grass/**/*.py"), *REPO.glob("hydra_plugins/lightning_grass_launcher/*.py")]
    assert modules and {str(path.relative_to(REPO)) for path in modules} <= names
    configs = list(REPO.glob("conf/**/*.yaml"))
    assert len(configs) > 20
    assert {f"lightning_grass/conf/{path.relative_to(REPO / 'conf')}" for path in configs} <= names
    assert not any(name.startswith(("tests/", "experiments/", "conf/")) for name in names)
