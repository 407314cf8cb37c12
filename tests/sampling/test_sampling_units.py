"""The units GRASS samples: layers, or the weight matrices inside them, on every architecture discovery supports."""

import peft
import pytest
from multimodal_models import FACTORIES
from test_layer_discovery import ARCHITECTURES, GPT
from torch import nn

from lightning_grass import discover_layers
from lightning_grass.sampling.sampling_units import sampling_units

MODELS = {
    **{name: (lambda cls=cls, config=config: cls(config)) for name, (cls, config, *_) in ARCHITECTURES.items()},
    **FACTORIES,
    "litgpt": GPT,
}

LLAMA_MODULES = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]

# The modules of the first block, in registration order, for one architecture of each kind of block.
FIRST_BLOCK = {
    "llama": LLAMA_MODULES,
    "qwen2_5_vl": LLAMA_MODULES,
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
    "gpt_neox": ["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
    "opt": ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2"],
    "phi3": ["self_attn.o_proj", "self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"],
    "mixtral": [*LLAMA_MODULES[:4], "mlp.gate", "mlp.experts"],  # the router, and the experts' fused weights
    "t5": [
        *(f"layer.0.SelfAttention.{name}" for name in ("q", "k", "v", "o", "relative_attention_bias")),
        "layer.1.DenseReluDense.wi",
        "layer.1.DenseReluDense.wo",
    ],
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_weight_matrix_of_the_blocks_is_in_one_module_unit_and_only_vectors_are_left_out(name):
    layer_map = discover_layers(MODELS[name]())
    units = sampling_units(layer_map, "module")

    in_units = [id(p) for params in units.parameters for p in params]
    assert len(in_units) == len(set(in_units)), "no parameter is in two units"
    left_out = {id(p) for p in units.left_out}
    in_blocks = {id(p): p for i in range(layer_map.num_layers) for p in layer_map.layer_parameters(i)}
    assert set(in_units) | left_out == set(in_blocks) and not set(in_units) & left_out
    assert all(p.ndim < 2 for p in units.left_out), "only norms and other vectors stay frozen"
    for index, params in enumerate(units.parameters):
        layer, _, path = units.names[index].partition(".")
        module = layer_map.blocks[int(layer)].get_submodule(path)
        assert int(layer) == units.layers[index]
        assert list(params) == list(module.parameters(recurse=False)), "a unit is its module's own parameters"
        assert any(p.ndim >= 2 for p in params)
    assert units.layers == tuple(sorted(units.layers)), "blocks in forward order"
    assert set(units.layers) == set(range(layer_map.num_layers)) or name == "zamba2"
    if name in FIRST_BLOCK:
        first = [n.partition(".")[2] for n, layer in zip(units.names, units.layers, strict=True) if layer == 0]
        assert first == FIRST_BLOCK[name]
        norms = [m for m in layer_map.blocks[0].modules() if "norm" in type(m).__name__.lower()]
        assert norms and all(id(p) in left_out for m in norms for p in m.parameters()), "the block's norms"


def test_a_module_shared_by_several_blocks_is_one_unit_at_the_first_block_that_holds_it():
    layer_map = discover_layers(FACTORIES["zamba2"]())
    units = sampling_units(layer_map, "module")
    shared = {id(p) for p, _ in layer_map.shared}
    holders = [index for index, params in enumerate(units.parameters) if any(id(p) in shared for p in params)]
    assert {units.layers[index] for index in holders} == {1}, "blocks 1, 3 and 5 hold it; block 1 comes first"
    assert {id(p) for index in holders for p in units.parameters[index]} | {
        id(p) for p in units.left_out if id(p) in shared
    } == shared


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5", "zamba2"])
def test_layer_units_are_the_blocks(name):
    layer_map = discover_layers(MODELS[name]())
    units = sampling_units(layer_map, "layer")
    assert units.names == tuple(str(i) for i in range(layer_map.num_layers))
    assert units.layers == tuple(range(layer_map.num_layers)) and units.left_out == ()
    assert [list(params) for params in units.parameters] == [
        layer_map.layer_parameters(i) for i in range(layer_map.num_layers)
    ]


def test_the_lora_matrices_of_a_peft_model_are_units_of_their_own():
    cls, config, *_ = ARCHITECTURES["llama"]
    model = peft.get_peft_model(cls(config), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    units = sampling_units(discover_layers(model), "module")
    first = [n.partition(".")[2] for n, layer in zip(units.names, units.layers, strict=True) if layer == 0]
    assert first[:3] == [
        "self_attn.q_proj.base_layer",
        "self_attn.q_proj.lora_A.default",
        "self_attn.q_proj.lora_B.default",
    ]
    trainable = [
        n for n, params in zip(units.names, units.parameters, strict=True) if any(p.requires_grad for p in params)
    ]
    assert len(trainable) == 2 * 2 * 3, "A and B of q_proj and v_proj in 3 layers"


def test_an_unknown_unit_is_refused():
    layer_map = discover_layers(nn.Sequential(nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])))
    with pytest.raises(ValueError, match=r"unit='block' is not supported; use one of \('layer', 'module'\)"):
        sampling_units(layer_map, "block")
