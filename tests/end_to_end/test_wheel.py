"""The wheel carries every module and every config, so that an installed grass-train needs no checkout."""

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_wheel_holds_every_module_and_every_config(tmp_path):
    command = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", tmp_path]
    subprocess.run([*command, str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    modules = [*REPO.glob("lightning_grass/**/*.py"), *REPO.glob("hydra_plugins/lightning_grass_launcher/*.py")]
    assert modules and {str(path.relative_to(REPO)) for path in modules} <= names
    configs = list(REPO.glob("conf/**/*.yaml"))
    assert len(configs) > 20
    assert {f"lightning_grass/conf/{path.relative_to(REPO / 'conf')}" for path in configs} <= names
    assert not any(name.startswith(("tests/", "experiments/", "conf/")) for name in names)
