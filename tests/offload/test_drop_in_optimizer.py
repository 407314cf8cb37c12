"""OffloadedOptimizer stands in for the optimizer it wraps: hooks, closures, added groups, repr, restores."""

import copy

import pytest
import torch
from conftest import VOCAB, TinyCausalLM, make_trainer, tiny_llama_config, token_batches
from layer_windows import layer_params
from lightning.pytorch.callbacks import BaseFinetuning, Callback, ModelCheckpoint
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from transformers import LlamaForCausalLM

from lightning_grass import GRASSCallback, GRASSStrategy
from lightning_grass.errors import SettingValueError
from lightning_grass.offload import (
    MASTER_KEY,
    DiskTier,
    HostTier,
    OffloadedOptimizer,
    TensorStateStore,
    device_bytes_while_stepped,
)

# The cores are shared: contended intra-op threads make these tiny fits ten times slower.
pytestmark = pytest.mark.usefixtures("one_thread")


class Finetuned(TinyCausalLM):
    """TinyCausalLM over the parameters that require a gradient, as BaseFinetuning asks of configure_optimizers."""

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr, weight_decay=0.1)


class UnfreezeFirstBlock(BaseFinetuning):
    """Freezes the first block before training; at epoch 1 adds it to the optimizer as a new parameter group.

    A resumed run restores the group (``on_fit_start``) but freezes the block again (``setup``): later epochs
    make it trainable.
    """

    def freeze_before_training(self, pl_module):
        self.freeze(pl_module.model.model.layers[0])

    def finetune_function(self, pl_module, epoch, optimizer):
        if epoch == 1:
            self.unfreeze_and_add_param_group(pl_module.model.model.layers[0], optimizer)
        elif epoch > 1:
            self.make_trainable(pl_module.model.model.layers[0])


class FinalState(Callback):
    """The optimizer's full state at the end of training, before the strategy frees its offload tier."""

    def on_train_end(self, trainer, pl_module):
        self.state = copy.deepcopy(trainer.optimizers[0].state_dict())


class Hooked(TinyCausalLM):
    """Counts the inner optimizer's ``step()`` calls and records every step hook, in order, in ``events``."""

    def __init__(self, events):
        super().__init__()
        self.events, self.updates = events, 0

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        step = optimizer.step

        def counted(*args, **kwargs):
            self.updates += 1
            return step(*args, **kwargs)

        optimizer.step = counted
        optimizer.register_step_pre_hook(lambda opt, *_: self.events.append(f"inner pre {type(opt).__name__}"))
        optimizer.register_step_post_hook(lambda opt, *_: self.events.append(f"inner post {type(opt).__name__}"))
        return optimizer

    def on_train_start(self):
        # Through Lightning's LightningOptimizer, as a user's module reaches its optimizer.
        self.optimizers().register_step_pre_hook(lambda *_: self.events.append("wrapper pre"))
        self.optimizers().register_step_post_hook(lambda *_: self.events.append("wrapper post"))


def streaming_budget():
    """Room for two of the largest layer tensors while stepped: two layers of 9 tensors stream one at a time."""
    module = TinyCausalLM()
    optimizer = module.configure_optimizers()
    return 2 * max(device_bytes_while_stepped(optimizer, p, False) for p in layer_params(module.model))


@pytest.mark.parametrize("setting", ["masters", "keep", "stream"])
def test_step_hooks_fire_once_per_training_step(setting):
    events = []
    module = Hooked(events)
    if setting == "masters":
        strategy, callbacks, precision = GRASSStrategy(), [], "bf16-true"
    else:
        budget = streaming_budget() if setting == "stream" else None
        strategy, precision = GRASSStrategy(offload="cpu", max_resident_bytes=budget), "32-true"
        callbacks = [GRASSCallback(mode="lisa", n_active=2, sample_every=2, seed=0)]
    handles = [
        register_optimizer_step_pre_hook(lambda opt, *_: events.append(f"global pre {type(opt).__name__}")),
        register_optimizer_step_post_hook(lambda opt, *_: events.append(f"global post {type(opt).__name__}")),
    ]
    try:
        trainer = make_trainer(max_steps=6, strategy=strategy, callbacks=callbacks, precision=precision)
        trainer.fit(module, token_batches())
    finally:
        for handle in handles:
            handle.remove()

    one_step = [
        "global pre OffloadedOptimizer",
        "wrapper pre",
        "inner pre AdamW",
        "inner post AdamW",
        "wrapper post",
        "global post OffloadedOptimizer",
    ]
    assert events == one_step * 6
    # The inner step() ran once per update, and its hooks and the global ones would have fired at each: with masters
    # alone, one update; kept, the resident tensors', then the two active layers'; streamed, the resident tensors',
    # then each of the two active layers' 9 tensors alone.
    updates_per_step = {"masters": 1, "keep": 2, "stream": 1 + 2 * 9}[setting]
    assert module.updates == 6 * updates_per_step


def test_repr_names_the_wrapped_optimizer_once_inside_lightning_optimizer():
    model = LlamaForCausalLM(tiny_llama_config(2))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    store = TensorStateStore(sgd, layer_params(model), HostTier(torch.device("cpu")))
    offloaded = OffloadedOptimizer(sgd, store)
    assert repr(offloaded) == f"OffloadedOptimizer({sgd!r}, offloaded=18, masters=0)"
    # Lightning wraps every optimizer in a subclass of it named Lightning<name>: LightningSGD (...) for a plain one.
    assert repr(LightningOptimizer(sgd)).startswith("LightningSGD (\nParameter Group 0\n")
    assert repr(LightningOptimizer(offloaded)) == f"LightningOffloadedOptimizer({sgd!r}, offloaded=18, masters=0)"
    half = copy.deepcopy(model).to(torch.bfloat16)
    adamw = torch.optim.AdamW(half.parameters())
    assert repr(OffloadedOptimizer(adamw, None, half.parameters())).endswith(", offloaded=0, masters=21)")


def test_a_group_added_later_is_stepped_with_its_state_resident(tmp_path):
    torch.manual_seed(0)
    reference = LlamaForCausalLM(tiny_llama_config(4))
    model = copy.deepcopy(reference)
    # The first block joins the optimizer after the store over the other blocks was built, as BaseFinetuning does.
    first, reference_first = list(model.model.layers[0].parameters()), list(reference.model.layers[0].parameters())
    for p in first + reference_first:
        p.requires_grad_(False)
    plain = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2)
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    excluded = {id(p) for p in first}
    stored = [p for p in layer_params(model) if id(p) not in excluded]
    budget = 2 * max(device_bytes_while_stepped(inner, p, False) for p in stored)
    store = TensorStateStore(inner, stored, DiskTier(tmp_path), budget)
    offloaded = OffloadedOptimizer(inner, store)
    offloaded.set_active(list(range(len(stored))))
    generator = torch.Generator().manual_seed(1)
    for step in range(4):
        if step == 2:
            for p in first + reference_first:
                p.requires_grad_(True)
            plain.add_param_group({"params": reference_first, "lr": 1e-3})
            offloaded.add_param_group({"params": first, "lr": 1e-3})
        tokens = torch.randint(0, VOCAB, (2, 12), generator=generator)
        for net, optimizer in ((reference, plain), (model, offloaded)):
            optimizer.zero_grad()
            net(input_ids=tokens, labels=tokens).loss.backward()
            optimizer.step()

    for (name, p), q in zip(reference.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert all(p in offloaded.state and offloaded.state[p]["step"] == 2 for p in first), "stepped twice, resident"
    assert not any(p in offloaded.state for p in stored), "the store's tensors streamed back to the tier"
    resident = [p for p in model.parameters() if id(p) not in {id(s) for s in stored}]
    assert offloaded.unmanaged_state_bytes() == sum(8 * p.numel() + 4 for p in resident)
    store.close()


def lbfgs_closure(model, tokens):
    def closure():
        model.zero_grad()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        return loss

    return closure


def closure_on_fp32_weights(twin, weights, tokens):
    """Evaluate the bf16 ``twin`` at the fp32 ``weights`` rounded, and give them its gradients in fp32."""
    evaluate = lbfgs_closure(twin, tokens)

    def closure():
        with torch.no_grad():
            for param, weight in zip(twin.parameters(), weights, strict=True):
                param.copy_(weight)
        loss = evaluate()
        for param, weight in zip(twin.parameters(), weights, strict=True):
            weight.grad = param.grad.float()
        return loss

    return closure


def test_lbfgs_steps_its_fp32_masters_as_lbfgs_steps_fp32_weights_evaluated_in_bf16():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(2)).to(torch.bfloat16)
    twin = copy.deepcopy(model)
    masters = [p.detach().float().requires_grad_() for p in model.parameters()]
    plain = torch.optim.LBFGS(masters, lr=0.5, max_iter=3, history_size=4)
    lbfgs = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3, history_size=4)
    offloaded = OffloadedOptimizer(lbfgs, None, model.parameters())
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        tokens = torch.randint(0, VOCAB, (2, 12), generator=generator)
        loss = offloaded.step(lbfgs_closure(model, tokens))
        assert torch.equal(loss, plain.step(closure_on_fp32_weights(twin, masters, tokens)))

    state = offloaded.state_dict()["state"]
    for index, (p, master) in enumerate(zip(model.parameters(), masters, strict=True)):
        assert torch.equal(state[index][MASTER_KEY], master.detach()), index
        assert torch.equal(p, master.detach().to(torch.bfloat16)), index
    expected = plain.state_dict()["state"][0]  # LBFGS keeps its whole state with its first parameter
    # Each step stops at max_eval = 3 evaluations (max_iter * 5 // 4): two iterations, five curvature pairs kept 4.
    assert expected["n_iter"] == 6 and len(expected["old_dirs"]) == 4
    assert expected.keys() | {MASTER_KEY} == state[0].keys()
    for key, value in expected.items():
        values, saved = (value, state[0][key]) if isinstance(value, list) else ([value], [state[0][key]])
        assert all(
            a is b is None or torch.equal(torch.as_tensor(a), torch.as_tensor(b))
            for a, b in zip(values, saved, strict=True)
        ), key


def test_lbfgs_on_masters_resumes_exactly_history_included():
    def run(model, optimizer, seed):
        generator = torch.Generator().manual_seed(seed)
        for _ in range(2):
            tokens = torch.randint(0, VOCAB, (2, 12), generator=generator)
            optimizer.step(lbfgs_closure(model, tokens))

    def wrapped(model):
        lbfgs = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3, history_size=4)
        return OffloadedOptimizer(lbfgs, None, model.parameters())

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(2)).to(torch.bfloat16)
    resumed_model = copy.deepcopy(model)
    uninterrupted = wrapped(model)
    run(model, uninterrupted, seed=1)
    run(model, uninterrupted, seed=2)
    first = wrapped(resumed_model)
    run(resumed_model, first, seed=1)
    saved = copy.deepcopy(first.state_dict())
    resumed = wrapped(resumed_model)
    resumed.load_state_dict(saved)
    assert all(t.dtype == torch.float32 for t in resumed.state[next(resumed_model.parameters())]["old_dirs"])
    run(resumed_model, resumed, seed=2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True))


class LBFGSModule(TinyCausalLM):
    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=3)


def test_offloading_the_states_of_a_closure_optimizer_is_refused_before_training(tmp_path):
    module = LBFGSModule()
    before = copy.deepcopy(module.state_dict())
    strategy = GRASSStrategy(offload="disk", offload_dir=tmp_path)
    trainer = make_trainer(max_steps=2, strategy=strategy, callbacks=[GRASSCallback(mode="fixed", fixed_layers=[0])])
    with pytest.raises(
        SettingValueError,
        match=r"the optimizer states of LBFGS cannot be offloaded: LBFGS\.step\(\) requires a closure, .* Pass "
        r"offload='none' to the strategy",
    ):
        trainer.fit(module, token_batches())
    assert all(torch.equal(before[name], p) for name, p in module.state_dict().items())
    assert list(tmp_path.iterdir()) == [], "refused before a tier was made"
    with pytest.raises(SettingValueError, match="requires a closure"):
        lbfgs = torch.optim.LBFGS(module.parameters())
        OffloadedOptimizer(lbfgs, TensorStateStore(lbfgs, layer_params(module.model), HostTier(torch.device("cpu"))))


def test_base_finetuning_restores_its_groups_and_the_unfrozen_block_trains_on_after_resume(tmp_path):
    def run(max_epochs, resume_from=None):
        module = Finetuned(weight_decay=0.1)
        final = FinalState()
        checkpoints = ModelCheckpoint(tmp_path, filename="{epoch}", every_n_epochs=1, save_top_k=-1)
        callbacks = [UnfreezeFirstBlock(), final, checkpoints]
        trainer = make_trainer(
            max_epochs=max_epochs,
            strategy=GRASSStrategy(),
            precision="bf16-true",
            callbacks=callbacks,
            enable_checkpointing=True,
        )
        trainer.fit(module, token_batches(num_batches=2), ckpt_path=resume_from)
        return module, final.state

    full, full_state = run(3)
    resumed, resumed_state = run(3, resume_from=tmp_path / "epoch=1.ckpt")  # the group came at epoch 1

    assert all(torch.equal(p, q) for p, q in zip(full.parameters(), resumed.parameters(), strict=True))
    saved = torch.load(tmp_path / "epoch=1.ckpt", weights_only=False)["optimizer_states"][0]
    assert [len(g["params"]) for g in saved["param_groups"]] == [39 - 9, 9]
    assert [len(g["params"]) for g in resumed_state["param_groups"]] == [39 - 9, 9]
    first_block = saved["param_groups"][1]["params"]
    for index in first_block:
        assert torch.equal(resumed_state["state"][index][MASTER_KEY], full_state["state"][index][MASTER_KEY])
        # Its master moved after the resume: the restored group was stepped.
        assert not torch.equal(resumed_state["state"][index][MASTER_KEY], saved["state"][index][MASTER_KEY])
    assert resumed_state["param_groups"][1]["lr"] == pytest.approx(1e-3)


@pytest.mark.parametrize("setting", ["single_device", "grass", "grass_with_callback"])
def test_a_checkpoint_with_no_optimizer_state_resumes_with_fresh_states(tmp_path, setting):
    def run(max_steps, resume_from=None):
        module = TinyCausalLM(weight_decay=0.1)
        final = FinalState()
        callbacks = [final]
        if setting == "grass_with_callback":
            callbacks.append(GRASSCallback(mode="lisa", n_active=2, sample_every=2, seed=0))
        callbacks.append(ModelCheckpoint(tmp_path, filename="{step}", every_n_train_steps=4, save_top_k=-1))
        strategy = SingleDeviceStrategy("cpu") if setting == "single_device" else GRASSStrategy(offload="cpu")
        trainer = make_trainer(max_steps=max_steps, strategy=strategy, callbacks=callbacks, enable_checkpointing=True)
        trainer.fit(module, token_batches(num_batches=4), ckpt_path=resume_from)  # epochs of 4 steps
        return module, final.state

    run(4)
    checkpoint = torch.load(tmp_path / "step=4.ckpt", weights_only=False)
    checkpoint["optimizer_states"] = []  # fewer states than optimizers, as some frameworks on Lightning save
    torch.save(checkpoint, tmp_path / "no_optimizer_state.ckpt")
    _, state = run(8, resume_from=tmp_path / "no_optimizer_state.ckpt")

    steps = [float(values["step"]) for values in state["state"].values()]
    if setting == "grass_with_callback":
        assert max(steps) == 4 and min(steps) >= 1, "fresh states: at most the 4 steps since the resume"
    else:
        assert steps == [4.0] * 39, "every parameter stepped the 4 steps since the resume, from a fresh state"
