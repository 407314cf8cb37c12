"""Vision-language, encoder-decoder and hybrid models: the language model's blocks are sampled, the towers are
frozen unless asked for, and a block shared by several layers trains while any of them is active."""

import os
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from conftest import make_trainer
from lightning import LightningModule
from lightning.pytorch.callbacks import Callback
from multimodal_models import FACTORIES, llava_batch, qwen2_5_vl_batch
from torch.distributed.fsdp import FSDPModule
from torch.utils.data import DataLoader

from lightning_grass import GRASSCallback, GRASSStrategy, discover_layers, estimate_memory
from lightning_grass.offload.sharded_tensors import local_part
from lightning_grass.sampling import layer_discovery as discovery
from lightning_grass.strategies.fsdp import GRASSFSDPStrategy

# Per architecture: the block path, the stacks not chosen, and the subtrees that make up the towers.
LAYOUTS = {
    "qwen2_5_vl": ("model.language_model.layers", ("model.visual.blocks",), ("model.visual",)),
    "qwen3_vl": (
        "model.language_model.layers",
        ("model.visual.blocks", "model.visual.deepstack_merger_list"),
        ("model.visual",),
    ),
    "qwen3_vl_moe": (
        "model.language_model.layers",
        ("model.visual.blocks", "model.visual.deepstack_merger_list"),
        ("model.visual",),
    ),
    "gemma3_vlm": (
        "model.language_model.layers",
        ("model.vision_tower.encoder.layers",),
        ("model.vision_tower", "model.multi_modal_projector"),
    ),
    "llava_qwen2_siglip": (
        "model.language_model.layers",
        ("model.vision_tower.encoder.layers",),
        ("model.vision_tower", "model.multi_modal_projector"),
    ),
    "idefics3": (
        "model.text_model.layers",
        ("model.vision_model.encoder.layers",),
        ("model.vision_model", "model.connector"),
    ),
    "mllama": (
        "model.language_model.layers",
        ("model.vision_model.transformer.layers", "model.vision_model.global_transformer.layers"),
        ("model.vision_model", "model.multi_modal_projector"),
    ),
    "phi4_multimodal": (
        "model.layers",
        (
            "model.embed_tokens_extend.image_embed.img_processor.encoder.layers",
            "model.embed_tokens_extend.audio_embed.encoder.encoders",
        ),
        ("model.embed_tokens_extend",),
    ),
    "t5": ("encoder.block,decoder.block", (), ()),
    "zamba2": ("model.layers", (), ()),
}


def _group_of_every_parameter(model, layer_map):
    groups = {id(p): "blocks" for block in layer_map.blocks for p in block.parameters()}
    for group in discovery.ALWAYS_ON_GROUPS:
        for p in layer_map.group_parameters(group):
            assert id(p) not in groups, f"a parameter in {groups[id(p)]} and {group}"
            groups[id(p)] = group
    return {name: groups.get(id(p)) for name, p in model.named_parameters()}


@pytest.mark.parametrize("rule", ["table", "fallback"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_the_language_models_blocks_are_chosen_and_every_parameter_has_one_group(name, rule, monkeypatch):
    if rule == "fallback":
        monkeypatch.setattr(discovery, "KNOWN_LAYOUTS", ())
    model = FACTORIES[name]()
    path, others, tower_roots = LAYOUTS[name]
    layer_map = discover_layers(model)
    assert (layer_map.path, layer_map.found_by, layer_map.other_stacks) == (path, rule, others)
    groups = _group_of_every_parameter(model, layer_map)
    for parameter, group in groups.items():
        in_blocks = any(parameter.startswith(p + ".") for p in path.split(","))
        in_towers = any(parameter.startswith(root + ".") for root in tower_roots)
        expected = "blocks" if in_blocks else "towers" if in_towers else group
        assert group == expected and group in ("blocks", "embeddings", "head", "final_norm", "towers"), parameter
    embedding = model.get_input_embeddings().weight
    assert any(p is embedding for p in layer_map.group_parameters("embeddings"))


def test_an_encoder_decoder_pools_both_stacks_encoder_first():
    model = FACTORIES["t5"]()
    layer_map = discover_layers(model)
    assert layer_map.blocks == [*model.encoder.block, *model.decoder.block]
    norms = [model.encoder.final_layer_norm, model.decoder.final_layer_norm]
    assert layer_map.final_norm == norms


def test_a_block_shared_by_several_layers_is_listed_with_its_layers():
    layer_map = discover_layers(FACTORIES["zamba2"]())
    assert len(layer_map.shared) == 14
    assert {indices for _, indices in layer_map.shared} == {(1, 3, 5)}


class ImageLM(LightningModule):
    """A vision-language model trained on one fixed batch (an image and its caption)."""

    def __init__(self, model, batch):
        super().__init__()
        self.model = model
        self.batch = batch

    def training_step(self, batch, batch_idx):
        return self.model(**self.batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        return DataLoader([0] * 4, batch_size=1)


class GradientRecorder(Callback):
    """The names of the parameters that hold a gradient at each optimizer step."""

    def __init__(self):
        self.with_gradient = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.with_gradient.append({n for n, p in pl_module.named_parameters() if p.grad is not None})


@pytest.mark.parametrize(
    ("name", "batch", "train_towers"),
    [
        ("qwen2_5_vl", qwen2_5_vl_batch, False),
        ("llava_qwen2_siglip", llava_batch, False),
        ("qwen2_5_vl", qwen2_5_vl_batch, True),
    ],
)
def test_one_step_trains_the_active_block_and_the_enabled_groups_only(name, batch, train_towers):
    model = FACTORIES[name]()
    module = ImageLM(model, batch(model))
    callback = GRASSCallback(mode="lisa", n_active=1, seed=0, train_towers=train_towers)
    recorder = GradientRecorder()
    trainer = make_trainer(max_steps=1, strategy=GRASSStrategy(offload="cpu"), callbacks=[callback, recorder])
    trainer.fit(module)
    layer_map = callback.layer_map
    groups = _group_of_every_parameter(module, layer_map)
    active = {id(p) for p in layer_map.layer_parameters(callback.active_layers[0])}
    enabled = {"embeddings", "head", "final_norm"} | ({"towers"} if train_towers else set())
    params = dict(module.named_parameters())
    allowed = {n for n, group in groups.items() if group in enabled or id(params[n]) in active}
    assert recorder.with_gradient[0] <= allowed
    assert any(n.startswith("model.model.language_model.layers.") for n in recorder.with_gradient[0])
    towers_with_gradient = {n for n in recorder.with_gradient[0] if groups[n] == "towers"}
    assert bool(towers_with_gradient) == train_towers
    expected = sum(p.numel() for n, p in params.items() if n in allowed and groups[n] in enabled | {"blocks"})
    assert callback.trainable_parameters_per_step() == expected


class ZambaLM(LightningModule):
    def __init__(self):
        super().__init__()
        self.model = FACTORIES["zamba2"]()
        self.input_ids = torch.arange(8).unsqueeze(0) % 200

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=self.input_ids, labels=self.input_ids).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        return DataLoader([0] * 4, batch_size=1)


@pytest.mark.parametrize(("fixed_layers", "shared_trains"), [([1], True), ([1, 3, 5], True), ([0, 2], False)])
def test_a_shared_block_trains_while_any_layer_holding_it_is_active(fixed_layers, shared_trains):
    module = ZambaLM()
    callback = GRASSCallback(mode="fixed", fixed_layers=fixed_layers)
    recorder = GradientRecorder()
    trainer = make_trainer(max_steps=1, callbacks=[callback, recorder])
    trainer.fit(module)
    shared = {id(p) for p, _ in callback.layer_map.shared}
    names = {n for n, p in module.named_parameters() if id(p) in shared}
    # The adapters of the shared block are registered in every hybrid layer, but adapter i serves hybrid layer i.
    used = {n for n in names if "adapter_list" not in n}
    assert used <= recorder.with_gradient[0] if shared_trains else not names & recorder.with_gradient[0]


def test_the_estimate_counts_the_towers_state_only_when_they_train():
    model = FACTORIES["llava_qwen2_siglip"]()
    frozen = estimate_memory(model, n_active=1, offload="none")
    trained = estimate_memory(model, n_active=1, offload="none", train_towers=True)
    towers = discover_layers(model).group_parameters("towers")
    assert frozen.weights == trained.weights == 4 * sum(p.numel() for p in model.parameters())
    assert trained.gradients - frozen.gradients == 4 * sum(p.numel() for p in towers)
    assert trained.optimizer_states > frozen.optimizer_states + 8 * sum(p.numel() for p in towers) - 1


def test_grass_fsdp_on_one_process_shards_a_vision_language_model_and_keeps_its_towers_frozen():
    model = FACTORIES["qwen2_5_vl"]()
    module = ImageLM(model, qwen2_5_vl_batch(model))
    towers_before = [p.detach().clone() for p in discover_layers(model).group_parameters("towers")]
    callback = GRASSCallback(mode="lisa", n_active=1, seed=0)
    strategy = GRASSFSDPStrategy(offload="cpu", process_group_backend="gloo")
    with mock.patch.dict(os.environ):  # Lightning sets MASTER_ADDR and MASTER_PORT for the process group
        try:
            trainer = make_trainer(max_steps=2, strategy=strategy, callbacks=[callback])
            trainer.fit(module)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    assert trainer.global_step == 2
    assert all(isinstance(block, FSDPModule) for block in callback.layer_map.blocks)
    towers_after = [local_part(p).detach() for p in callback.layer_map.group_parameters("towers")]
    assert all(torch.equal(a, b) for a, b in zip(towers_before, towers_after, strict=True))


def test_an_override_names_one_stack_or_pools_several():
    model = FACTORIES["t5"]()
    decoder_only = discover_layers(model, layers="decoder.block")
    assert (decoder_only.path, decoder_only.found_by, decoder_only.blocks) == (
        "decoder.block",
        "override",
        list(model.decoder.block),
    )
    assert decoder_only.other_stacks == ("encoder.block",), "the encoder is a tower: frozen unless train_towers"
    encoder = {id(p) for p in model.encoder.parameters()} - {id(model.shared.weight)}
    assert {id(p) for p in decoder_only.group_parameters("towers")} == encoder
    assert any(p is model.shared.weight for p in decoder_only.group_parameters("embeddings"))
    both = discover_layers(model, layers="encoder.block, decoder.block")
    assert (both.path, both.num_layers) == ("encoder.block,decoder.block", 4)
