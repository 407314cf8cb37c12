"""The strategy names: one table, registered by ``import lightning_grass``, each building its class and settings."""

from lightning.pytorch.strategies import StrategyRegistry

import lightning_grass  # noqa: F401  (registers the names)
from lightning_grass.strategies.registry import STRATEGY_NAMES


def test_every_registered_grass_name_is_a_row_of_the_table_and_builds_what_it_says():
    registered = sorted(name for name in StrategyRegistry if name.startswith("grass"))
    assert registered == sorted(entry.name for entry in STRATEGY_NAMES)
    for entry in STRATEGY_NAMES:
        strategy = StrategyRegistry.get(entry.name)
        assert type(strategy) is entry.strategy, entry.name
        for setting, value in entry.settings.items():
            assert getattr(strategy, setting) == value, (entry.name, setting)
