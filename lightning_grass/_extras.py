"""Optional dependencies: what the ``app`` extra installs, and the error that says to install it."""

from __future__ import annotations

from collections.abc import Iterable
from importlib.util import find_spec

#: The import name of each distribution of the ``app`` extra in ``pyproject.toml``.
APP_EXTRA_MODULES = {
    "matplotlib": "matplotlib",
    "jsonargparse": "jsonargparse",
    "hydra-optuna-sweeper": "hydra_plugins.hydra_optuna_sweeper",
    "peft": "peft",
    "tensorboard": "tensorboard",
    "torchdata": "torchdata",
    "datasets": "datasets",
}

_INSTALL_APP = "pip install 'lightning_grass[app]'"


def require_app_extra(feature: str, modules: Iterable[str] = APP_EXTRA_MODULES.values()) -> None:
    """Raise before anything runs when modules of the ``app`` extra are missing, naming them and the extra.

    Args:
        feature: What needs them, for the message.
        modules: Import names to look for; nothing is imported.

    Raises:
        ModuleNotFoundError: Naming the missing modules and ``pip install 'lightning_grass[app]'``.
    """
    missing = [name for name in modules if find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(f"{feature} needs {', '.join(missing)}, from the app extra: {_INSTALL_APP}")
