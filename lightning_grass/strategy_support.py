"""Which Lightning strategies GRASSCallback can run on, and why the others would half-work.

The strategies of this package take part through :class:`~lightning_grass.ActiveLayerListener`. Lightning's own
strategies do not know about GRASS, so the reasons they cannot host it are kept here, one per strategy, in the
order they are checked (a subclass before its base).
"""

from __future__ import annotations

from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    Strategy,
)

from lightning_grass.errors import SettingValueError
from lightning_grass.sampling.layer_listener import ActiveLayerListener

#: Why DDP's ``static_graph=True`` cannot host GRASS, for every strategy that refuses it.
STATIC_GRAPH_REASON = (
    "static_graph=True cannot be used with GRASS: DDP's static graph assumes the same parameters get gradients at "
    "every step, and GRASS changes the trained layers at every resample"
)

#: Lightning strategies that cannot host GRASSCallback, with the reason and what to use instead.
UNSUPPORTED: tuple[tuple[type[Strategy], str], ...] = (
    (
        FSDPStrategy,
        "GRASSCallback does not run on FSDPStrategy (FSDP1): freezing blocks saves gradient memory there only with "
        "use_orig_params=True and one FSDP wrapper per transformer block (blocks sharing a flat parameter keep "
        "gradient memory while frozen), and the optimizer states of deactivated blocks would be dropped. Use "
        "strategy='grass_fsdp' (FSDP2: one shard group per block, sharded for you, states kept and offloaded), or "
        "'grass_ddp'",
    ),
    (
        ModelParallelStrategy,
        "GRASSCallback does not run on a plain ModelParallelStrategy: its gradient measurement and the optimizer "
        "states of deactivated blocks need grass_fsdp's handling of sharded (DTensor) tensors. Use "
        "strategy='grass_fsdp', which also shards each block for you",
    ),
    (
        DeepSpeedStrategy,
        "GRASSCallback does not support DeepSpeed: DeepSpeed manages its own optimizer state, so GRASS could neither "
        "freeze layers reliably nor keep their states. Use strategy='grass' or 'grass_ddp'",
    ),
)


def check_strategy_supports_grass(strategy: Strategy) -> None:
    """Refuse a strategy under which freezing layers would half-work, before any work.

    A strategy of this package (an :class:`~lightning_grass.ActiveLayerListener`) is accepted as it is.

    Raises:
        SettingValueError: For FSDP1, a plain ModelParallelStrategy, DeepSpeed, or DDP with ``static_graph``.
    """
    if isinstance(strategy, ActiveLayerListener):
        return
    for unsupported, reason in UNSUPPORTED:
        if isinstance(strategy, unsupported):
            raise SettingValueError(reason)
    if isinstance(strategy, DDPStrategy) and strategy._ddp_kwargs.get("static_graph"):
        raise SettingValueError(f"{STATIC_GRAPH_REASON}. Use strategy='grass_ddp'")
