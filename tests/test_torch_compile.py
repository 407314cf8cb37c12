"""torch.compile per block: GRASS's resamples reuse the compiled graphs, and training is eager's, bit for bit.

Compiling the whole model recompiles it for every new active set: dynamo guards on each parameter's
``requires_grad``, so with 8 layers and ``sample_every=1`` it hits its recompile limit (8) after 8 sets and
runs eager from then on. Compiling each block instead gives every block two states, trainable and frozen, and
the blocks share one code object (``LlamaDecoderLayer.forward``) whose parameters are graph inputs, so all of
them share two graphs.
"""

import torch
import torch._dynamo
from conftest import TinyCausalLM, make_trainer, token_batches
from lightning.pytorch.callbacks import Callback
from torch._dynamo.backends.debugging import aot_eager

from lightning_grass import GRASSCallback, discover_layers

NUM_LAYERS = 8
MAX_STEPS = 13


class CountingBackend:
    """``aot_eager`` (AOTAutograd's forward and backward graphs, run by torch's own eager kernels), counting graphs.

    It compiles in a fraction of inductor's time on a CPU. One instance serves every block: dynamo keeps a
    separate cache entry per backend object, so eight backends would need sixteen entries of one code object.
    """

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return aot_eager(graph_module, example_inputs)


class Record(Callback):
    """Each step's loss and the number of graphs compiled so far."""

    def __init__(self, backend: CountingBackend) -> None:
        self.backend, self.losses, self.graphs = backend, [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach())
        self.graphs.append(self.backend.graphs)


def fit(compiled: bool) -> tuple[TinyCausalLM, GRASSCallback, Record]:
    torch._dynamo.reset()
    module = TinyCausalLM(num_layers=NUM_LAYERS)
    module.model.config.use_cache = False  # a KV cache would make each block guard on its own cache slot
    record = Record(CountingBackend())
    if compiled:
        for block in discover_layers(module).blocks:
            block.compile(backend=record.backend)
    # temperature=4 spreads the draws over many different active sets.
    callback = GRASSCallback(mode="grass", n_active=2, probe_steps=2, sample_every=1, temperature=4.0, seed=0)
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):  # raise instead of falling back to eager
        make_trainer(max_steps=MAX_STEPS, callbacks=[callback, record]).fit(module, token_batches(MAX_STEPS))
    return module, callback, record


def test_compiled_blocks_keep_their_graphs_across_resamples_and_train_exactly_like_eager():
    eager_module, eager_callback, eager = fit(compiled=False)
    module, callback, compiled = fit(compiled=True)

    resamples = [record["active_layers"] for record in callback.history if record["resampled"]]
    assert len(resamples) == MAX_STEPS - 1, "a draw where probing ends (step 2), then one after every step"
    trained = {tuple(layers) for layers in resamples[:-1]}  # the last draw, at the last step, never trains
    assert len(trained) == 11, "eleven active sets, each a requires_grad pattern that whole-model compile guards on"
    # Probing trains every block (one graph); the first sampled step adds the frozen blocks' graph; then none.
    assert compiled.graphs == [1, 1] + [2] * (MAX_STEPS - 2)
    assert compiled.graphs[-1] <= 2 * NUM_LAYERS, "at most trainable and frozen per block"
    assert eager.graphs == [0] * MAX_STEPS

    # aot_eager runs the kernels eager runs, on the same inputs in the same order, and the backward graph is
    # autograd's own derivative formulas: nothing is fused or reordered, so the tolerance is zero. A difference
    # would mean the graphs compute something else, such as a stale graph that trains a frozen block.
    assert [c["active_layers"] for c in callback.history] == [e["active_layers"] for e in eager_callback.history]
    assert torch.equal(torch.stack(compiled.losses), torch.stack(eager.losses))
    assert all(torch.equal(p, q) for p, q in zip(module.parameters(), eager_module.parameters(), strict=True))
