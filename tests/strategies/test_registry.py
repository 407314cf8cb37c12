"""The strategy names: one table, registered by ``import lightning_grass``, each building its class and settings."""

from lightning.pytorch.strategies import StrategyRegistry

import lightning_grass  # noqa: F401  (registers the names)
from lightning_grass.strategies.registry import STRATEGY_NAMES, register_strategy_names


def test_every_registered_grass_name_is_a_row_of_the_table_and_builds_what_it_says():
    registered = sorted(name for name in StrategyRegistry if name.startswith("grass"))
    assert registered == sorted(entry.name for entry in STRATEGY_NAMES)
    for entry in STRATEGY_NAMES:
        strategy = StrategyRegistry.get(entry.name)
        assert type(strategy) is entry.strategy, entry.name
        for setting, value in entry.settings.items():
            assert getattr(strategy, setting) == value, (entry.name, setting)


def test_registration_is_idempotent():
    register_strategy_names(StrategyRegistry)
    register_strategy_names(StrategyRegistry)
    assert StrategyRegistry["grass_offload_disk"]["init_params"] == {"offload": "disk"}
    assert sorted(name for name in StrategyRegistry if name.startswith("grass")) == sorted(
        entry.name for entry in STRATEGY_NAMES
    )


def test_the_strategy_classes_leave_registration_to_the_table():
    """Lightning calls ``register_strategies`` for its own classes only; the GRASS classes do not override it."""
    for entry in STRATEGY_NAMES:
        assert "register_strategies" not in vars(entry.strategy), entry.strategy.__name__
