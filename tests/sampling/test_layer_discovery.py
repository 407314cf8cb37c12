import lightning.pytorch as pl
import pytest
import torch
import transformers as hf
from conftest import VOCAB, TinyCausalLM, make_trainer, tiny_llama_config, token_batches
from torch import nn
from torch.nn import functional

from lightning_grass import GRASSCallback, discover_layers

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
    assert _names(model, layer_map.head) == [head]
    assert model.get_input_embeddings() in layer_map.embeddings

    # A head tied to the token embedding (Gemma, Gemma2, GPT-2, OPT, Falcon, BLOOM here) is listed as tied, once.
    embedding = _names(model, [model.get_input_embeddings()])[0]
    if model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        [tied] = layer_map.tied
        assert (tied.group, tied.tied_to, tied.names) == (
            "embeddings",
            ("head",),
            (f"{embedding}.weight", "lm_head.weight"),
        )
    else:
        assert layer_map.tied == []

    # Every parameter is in exactly one block or in exactly one always-on group: nothing is left unmanaged.
    in_blocks = [id(p) for i in range(3) for p in layer_map.layer_parameters(i)]
    always_on = [id(p) for g in ("embeddings", "head", "final_norm") for p in layer_map.group_parameters(g)]
    assert len(in_blocks) == len(set(in_blocks))
    assert len(always_on) == len(set(always_on))
    assert not set(in_blocks) & set(always_on)
    assert set(in_blocks) | set(always_on) == {id(p) for p in model.parameters()}


def test_a_tied_head_weight_belongs_to_the_embeddings_and_is_listed_as_tied():
    model = hf.GPT2LMHeadModel(hf.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=32, vocab_size=64))
    layer_map = discover_layers(model)
    tied = model.lm_head.weight
    assert tied is model.transformer.wte.weight
    assert [p is tied for p in layer_map.group_parameters("embeddings")] == [True, False]  # wte, then wpe
    assert layer_map.group_parameters("head") == [], "the head holds no parameter of its own"
    assert [t.parameter for t in layer_map.tied] == [tied]


class RMSNorm(nn.Module):
    """litgpt.model.RMSNorm: one weight."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight


class CausalSelfAttention(nn.Module):
    """litgpt.model.CausalSelfAttention: one fused qkv projection and an output projection (no RoPE here)."""

    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.proj = nn.Linear(n_embd, n_embd, bias=False)

    def forward(self, x):
        batch, length, width = x.shape
        q, k, v = (t.view(batch, length, self.n_head, -1).transpose(1, 2) for t in self.qkv(x).split(width, dim=-1))
        y = functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


class LLaMAMLP(nn.Module):
    """litgpt.model.LLaMAMLP: fc_1, fc_2 and proj."""

    def __init__(self, n_embd: int, intermediate_size: int) -> None:
        super().__init__()
        self.fc_1 = nn.Linear(n_embd, intermediate_size, bias=False)
        self.fc_2 = nn.Linear(n_embd, intermediate_size, bias=False)
        self.proj = nn.Linear(intermediate_size, n_embd, bias=False)

    def forward(self, x):
        return self.proj(functional.silu(self.fc_1(x)) * self.fc_2(x))


class Block(nn.Module):
    """litgpt.model.Block for a Llama config: norm_1, attn, norm_2, mlp."""

    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.norm_1 = RMSNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.norm_2 = RMSNorm(n_embd)
        self.mlp = LLaMAMLP(n_embd, 2 * n_embd)

    def forward(self, x):
        x = x + self.attn(self.norm_1(x))
        return x + self.mlp(self.norm_2(x))


class GPT(nn.Module):
    """litgpt.model.GPT's module tree (litgpt 0.5.13): lm_head registered first, then the transformer.

    litgpt is not a test dependency: installing it would downgrade huggingface_hub and jsonargparse. This copies
    its structure, names and registration order, which are all that discovery reads.
    """

    def __init__(self, n_layer: int = 3, n_embd: int = 32, n_head: int = 4, vocab_size: int = VOCAB) -> None:
        super().__init__()
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab_size, n_embd),
                h=nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer)),
                ln_f=RMSNorm(n_embd),
            )
        )

    def forward(self, idx):
        x = self.transformer.wte(idx)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def test_a_litgpt_gpt_whose_head_is_registered_first_has_its_head_in_the_head_group():
    model = GPT()
    assert next(iter(model.named_children()))[0] == "lm_head"
    layer_map = discover_layers(model)
    assert (layer_map.path, layer_map.found_by, layer_map.num_layers) == ("transformer.h", "table", 3)
    assert _names(model, layer_map.embeddings) == ["transformer.wte"]
    assert _names(model, layer_map.head) == ["lm_head"]
    assert _names(model, layer_map.final_norm) == ["transformer.ln_f"]
    assert layer_map.group_parameters("head") == [model.lm_head.weight]
    assert layer_map.group_parameters("embeddings") == [model.transformer.wte.weight]
    assert layer_map.tied == []


def test_a_tied_litgpt_head_is_listed_under_both_names():
    model = GPT()
    model.lm_head.weight = model.transformer.wte.weight
    layer_map = discover_layers(model)
    assert _names(model, layer_map.head) == ["lm_head"]
    assert layer_map.group_parameters("head") == []
    [tied] = layer_map.tied
    assert tied.parameter is model.transformer.wte.weight
    assert (tied.group, tied.tied_to, tied.names) == (
        "embeddings",
        ("head",),
        ("lm_head.weight", "transformer.wte.weight"),
    )


class LitGPTModule(pl.LightningModule):
    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gpt = GPT()
        if tied:
            self.gpt.lm_head.weight = self.gpt.transformer.wte.weight

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        logits = self.gpt(tokens[:, :-1])
        return functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _changed_after_fit(module, **flags):
    before = {name: p.detach().clone() for name, p in module.named_parameters(remove_duplicate=False)}
    callback = GRASSCallback(mode="lisa", n_active=1, seed=0, **flags)
    make_trainer(max_steps=3, callbacks=[callback]).fit(module, token_batches())
    named = module.named_parameters(remove_duplicate=False)
    return {name for name, p in named if not torch.equal(before[name], p)}


@pytest.mark.parametrize(
    ("train_embeddings", "train_head"),
    [(True, False), (False, True), (False, False)],
    ids=["embeddings", "head", "none"],
)
def test_train_head_and_train_embeddings_of_a_litgpt_model_do_what_they_say(train_embeddings, train_head):
    changed = _changed_after_fit(LitGPTModule(), train_embeddings=train_embeddings, train_head=train_head)
    assert ("gpt.transformer.wte.weight" in changed) == train_embeddings
    assert ("gpt.lm_head.weight" in changed) == train_head
    assert "gpt.transformer.ln_f.weight" in changed, "train_final_norm stays True"


def test_a_tied_head_trains_with_the_embeddings():
    changed = _changed_after_fit(LitGPTModule(tied=True), train_embeddings=False, train_head=True)
    assert not {"gpt.transformer.wte.weight", "gpt.lm_head.weight"} & changed, "the tied weight follows the embeddings"
    changed = _changed_after_fit(LitGPTModule(tied=True), train_embeddings=True, train_head=False)
    assert {"gpt.transformer.wte.weight", "gpt.lm_head.weight"} <= changed


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


class _HeadFirstNet(nn.Module):
    """A model no table entry knows, with its output projection registered before everything else."""

    def __init__(self) -> None:
        super().__init__()
        self.readout = nn.Linear(16, 10)
        self.embed = nn.Embedding(10, 16)
        self.stack = nn.ModuleList(_Block(16) for _ in range(3))
        self.out_norm = nn.LayerNorm(16)


def test_fallback_classifies_a_head_registered_first_by_what_it_is():
    model = _HeadFirstNet()
    layer_map = discover_layers(model)
    assert (layer_map.path, layer_map.found_by) == ("stack", "fallback")
    assert _names(model, layer_map.embeddings) == ["embed"]
    assert _names(model, layer_map.head) == ["readout"]
    assert _names(model, layer_map.final_norm) == ["out_norm"]


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
    with pytest.raises(ValueError, match="group='lm_head' is not a group outside the blocks"):
        layer_map.group_parameters("lm_head")
