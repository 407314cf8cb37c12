import pytest
import transformers as hf
from conftest import TinyCausalLM, tiny_llama_config
from torch import nn

from lightning_grass import discover_layers

SMALL = dict(vocab_size=64)
DECODER = dict(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=4, **SMALL)

# (model class, config, expected block path, expected final norm, expected head)
ARCHITECTURES = {
    "llama": (
        hf.LlamaForCausalLM,
        hf.LlamaConfig(num_key_value_heads=2, **DECODER),
        "model.layers",
        "model.norm",
        "lm_head",
    ),
    "mistral": (
        hf.MistralForCausalLM,
        hf.MistralConfig(num_key_value_heads=2, **DECODER),
        "model.layers",
        "model.norm",
        "lm_head",
    ),
    "mixtral": (
        hf.MixtralForCausalLM,
        hf.MixtralConfig(num_key_value_heads=2, num_local_experts=8, **DECODER),
        "model.layers",
        "model.norm",
        "lm_head",
    ),
    "qwen2": (
        hf.Qwen2ForCausalLM,
        hf.Qwen2Config(num_key_value_heads=2, **DECODER),
        "model.layers",
        "model.norm",
        "lm_head",
    ),
    "qwen3": (
        hf.Qwen3ForCausalLM,
        hf.Qwen3Config(num_key_value_heads=2, head_dim=8, **DECODER),
        "model.layers",
        "model.norm",
        "lm_head",
    ),
    "gemma": (
        hf.GemmaForCausalLM,
        hf.GemmaConfig(num_key_value_heads=2, head_dim=8, **DECODER),
        "model.layers",
        "model.norm",
        "lm_head",
    ),
    "gemma2": (
        hf.Gemma2ForCausalLM,
        hf.Gemma2Config(num_key_value_heads=2, head_dim=8, **DECODER),
        "model.layers",
        "model.norm",
        "lm_head",
    ),
    "phi": (hf.PhiForCausalLM, hf.PhiConfig(**DECODER), "model.layers", "model.final_layernorm", "lm_head"),
    "phi3": (
        hf.Phi3ForCausalLM,
        hf.Phi3Config(num_key_value_heads=2, pad_token_id=0, **DECODER),
        "model.layers",
        "model.norm",
        "lm_head",
    ),
    "gpt2": (
        hf.GPT2LMHeadModel,
        hf.GPT2Config(n_layer=3, n_embd=32, n_head=4, n_positions=32, **SMALL),
        "transformer.h",
        "transformer.ln_f",
        "lm_head",
    ),
    "gpt_neox": (
        hf.GPTNeoXForCausalLM,
        hf.GPTNeoXConfig(**DECODER),
        "gpt_neox.layers",
        "gpt_neox.final_layer_norm",
        "lm_head",
    ),
    "gptj": (
        hf.GPTJForCausalLM,
        hf.GPTJConfig(n_layer=3, n_embd=32, n_head=4, rotary_dim=4, n_positions=32, **SMALL),
        "transformer.h",
        "transformer.ln_f",
        "lm_head",
    ),
    "opt": (
        hf.OPTForCausalLM,
        hf.OPTConfig(
            num_hidden_layers=3,
            hidden_size=32,
            ffn_dim=64,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            **SMALL,
        ),
        "model.decoder.layers",
        "model.decoder.final_layer_norm",
        "lm_head",
    ),
    "falcon": (
        hf.FalconForCausalLM,
        hf.FalconConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, **SMALL),
        "transformer.h",
        "transformer.ln_f",
        "lm_head",
    ),
    "bloom": (
        hf.BloomForCausalLM,
        hf.BloomConfig(n_layer=3, hidden_size=32, n_head=4, **SMALL),
        "transformer.h",
        "transformer.ln_f",
        "lm_head",
    ),
}


def _names(model: nn.Module, modules: list[nn.Module]) -> list[str]:
    by_id = {id(m): name for name, m in model.named_modules()}
    return [by_id[id(m)] for m in modules]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_discovers_every_supported_architecture(arch):
    model_cls, config, path, final_norm, head = ARCHITECTURES[arch]
    model = model_cls(config)
    layer_map = discover_layers(model)

    assert (layer_map.path, layer_map.found_by, layer_map.num_layers) == (path, "table", 3)
    assert layer_map.blocks == list(model.get_submodule(path))
    assert _names(model, layer_map.final_norm) == [final_norm]
    assert head in _names(model, layer_map.head)
    assert layer_map.embeddings, "the token embedding belongs to the embeddings group"

    # Every parameter is in exactly one block or in an always-on group: nothing is left unmanaged.
    in_blocks = [id(p) for i in range(3) for p in layer_map.layer_parameters(i)]
    always_on = {id(p) for g in ("embeddings", "head", "final_norm") for p in layer_map.group_parameters(g)}
    assert len(in_blocks) == len(set(in_blocks))
    assert not set(in_blocks) & always_on
    assert set(in_blocks) | always_on == {id(p) for p in model.parameters()}


def test_tied_head_weight_is_in_both_embeddings_and_head():
    model = hf.GPT2LMHeadModel(hf.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=32, vocab_size=64))
    layer_map = discover_layers(model)
    tied = model.lm_head.weight
    assert tied is model.transformer.wte.weight
    assert any(p is tied for p in layer_map.group_parameters("embeddings"))
    assert any(p is tied for p in layer_map.group_parameters("head"))


def test_finds_the_model_inside_a_lightning_module():
    layer_map = discover_layers(TinyCausalLM(num_layers=4))
    assert (layer_map.path, layer_map.num_layers, layer_map.found_by) == ("model.model.layers", 4, "table")


def test_finds_the_model_inside_a_peft_wrapper():
    peft = pytest.importorskip("peft", reason="peft is installed by the dev extra")
    base = hf.LlamaForCausalLM(tiny_llama_config(3))
    wrapped = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    layer_map = discover_layers(wrapped)
    assert layer_map.path == "base_model.model.model.layers"
    assert layer_map.num_layers == 3
    lora_in_layer_0 = [n for n, _ in layer_map.blocks[0].named_parameters() if "lora_" in n]
    assert len(lora_in_layer_0) == 4


def test_explicit_path_overrides_discovery():
    module = TinyCausalLM(num_layers=2)
    layer_map = discover_layers(module, layers="model.model.layers")
    assert (layer_map.path, layer_map.found_by, layer_map.num_layers) == ("model.model.layers", "override", 2)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("model.model.blocks", "no attribute 'blocks'"),
        ("model.model.norm", "resolves to LlamaRMSNorm, not a non-empty nn.ModuleList"),
        ("model.__class__", "resolves to type, not a non-empty nn.ModuleList"),
        ("model[0]", "no attribute 'model[0]'"),
    ],
)
def test_bad_override_path_lists_candidates(path, message):
    with pytest.raises(ValueError, match=r"Candidate paths: model.model.layers \(2 x LlamaDecoderLayer\)") as error:
        discover_layers(TinyCausalLM(num_layers=2), layers=path)
    assert message in str(error.value)
    assert repr(path) in str(error.value)


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)


class _CustomNet(nn.Module):
    """A model no table entry knows: blocks in 'stack', a smaller same-class list in 'adapters'."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.adapters = nn.ModuleList(_Block(4) for _ in range(6))
        self.stack = nn.ModuleList(_Block(16) for _ in range(3))
        self.out_norm = nn.LayerNorm(16)
        self.readout = nn.Linear(16, 10)


def test_fallback_picks_the_same_class_list_holding_most_parameters():
    model = _CustomNet()
    layer_map = discover_layers(model)
    assert (layer_map.path, layer_map.found_by, layer_map.num_layers) == ("stack", "fallback", 3)
    assert _names(model, layer_map.embeddings) == [
        "embed",
        "adapters.0.linear",
        *[f"adapters.{i}.linear" for i in range(1, 6)],
    ]
    assert _names(model, layer_map.final_norm) == ["out_norm"]
    assert _names(model, layer_map.head) == ["readout"]


def test_no_module_list_is_an_error_that_says_so():
    with pytest.raises(
        ValueError,
        match=r"no transformer blocks found in Sequential.*\(none: the model has no nn.ModuleList\)",
    ):
        discover_layers(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))


def test_mixed_class_list_is_listed_as_a_candidate():
    model = nn.Module()
    model.parts = nn.ModuleList([nn.Linear(2, 2), nn.LayerNorm(2)])
    with pytest.raises(ValueError, match=r"Candidate paths: parts \(2 x Linear\)\. Pass layers="):
        discover_layers(model)


def test_unknown_group_is_rejected():
    layer_map = discover_layers(TinyCausalLM(num_layers=2))
    with pytest.raises(ValueError, match="group='lm_head' is not an always-on group"):
        layer_map.group_parameters("lm_head")
