"""The app extra: what it holds, and the error that names it when it is missing."""

import importlib.metadata
import importlib.util

import pytest
from packaging.requirements import Requirement

from lightning_grass._extras import APP_EXTRA_MODULES, require_app_extra


def extra_requirements(extra):
    requirements = [Requirement(text) for text in importlib.metadata.requires("lightning_grass")]
    return {r.name for r in requirements if r.marker is not None and r.marker.evaluate({"extra": extra})}


def test_the_module_table_covers_the_app_extra_of_the_installed_metadata():
    assert set(APP_EXTRA_MODULES) == extra_requirements("app")


def test_the_core_install_holds_no_app_or_dev_dependency():
    core = {Requirement(text).name for text in importlib.metadata.requires("lightning_grass") if "extra" not in text}
    assert core == {
        "torch",
        "lightning",
        "torchmetrics",
        "transformers",
        "hydra-core",
        "omegaconf",
        "typing_extensions",
    }


def test_missing_modules_are_named_with_the_extra_that_installs_them(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        "lightning_grass._extras.find_spec",
        lambda name: None if name in ("peft", "tensorboard") else real_find_spec(name),
    )
    with pytest.raises(ModuleNotFoundError, match=r"^grass-train needs peft, tensorboard, from the app extra: "):
        require_app_extra("grass-train")
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'lightning_grass\[app\]'$"):
        require_app_extra("grass-train")
    require_app_extra("lightning_grass.app.plots", ["matplotlib"])
