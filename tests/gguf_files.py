"""A tiny Llama written as a GGUF file with the ``gguf`` package's own writer, as llama.cpp's converter lays it out.

The weights start in Hugging Face's layout (seeded, float32) and are written the way ``convert_hf_to_gguf.py``
writes a Llama: renamed to llama.cpp's tensor names, the query and key rows reordered by
:func:`llama_cpp_permute`, the output head left out when it is tied to the embedding. Its tokenizer is a byte-level
BPE (``tokenizer.ggml.model = gpt2``, like SmolLM2's): three control tokens, the 256 byte symbols and the tokens
of :data:`MERGES`. Reading the file back must therefore give :func:`write_tiny_llama_gguf`'s state dict exactly.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

LAYERS, HIDDEN, FFN, HEADS, KV_HEADS, CONTEXT = 2, 32, 64, 4, 2, 512

#: Control tokens first, as in SmolLM2: ids 0, 1, 2.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BOS_ID, EOS_ID = 1, 2

#: Merges in the byte alphabet (``Ġ`` is the space); each result is a token of the vocabulary.
MERGES = ["Ġ t", "h e", "Ġt he", "i s"]

#: A short ChatML template: SmolLM2's shape, without its 80-character system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Hugging Face's Llama parameter names, per layer, with llama.cpp's.
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def tiny_vocabulary() -> list[str]:
    """The control tokens, the 256 byte symbols (in ``bytes_to_unicode``'s order), then one token per merge."""
    return SPECIAL_TOKENS + list(bytes_to_unicode().values()) + [merge.replace(" ", "") for merge in MERGES]


def llama_cpp_permute(weights: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's order of a query or key projection's rows (``LlamaModel.permute`` in ``convert_hf_to_gguf.py``).

    Within each head, Hugging Face keeps the two rotary halves apart (rows ``0..d/2`` then ``d/2..d``); llama.cpp
    interleaves them (``0, d/2, 1, d/2+1, ...``). ``heads`` is the number of key-value heads for a key
    projection. transformers' GGUF reader undoes this (``LlamaTensorProcessor._reverse_permute_weights``).
    """
    rows = weights.shape[0]
    return weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name for a Hugging Face Llama parameter, e.g. ``blk.0.attn_q.weight``."""
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    module = rest.removesuffix(".weight")
    return f"blk.{layer}.{_LAYER_NAMES[module]}.weight"


def tiny_llama_state_dict(tied: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded float32 weights in Hugging Face's layout; ``lm_head.weight`` is the embedding itself when ``tied``."""
    config = LlamaConfig(
        num_hidden_layers=LAYERS,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=len(tiny_vocabulary()),
        tie_word_embeddings=tied,
    )
    with torch.device("meta"):
        shapes = {name: tensor.shape for name, tensor in LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in shapes.items():
        if tied and name == "lm_head.weight":
            continue
        values = 0.1 * torch.randn(shape, generator=generator)
        weights[name] = values + 1.0 if name.endswith("norm.weight") else values
    if tied:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    return weights


def write_tiny_llama_gguf(path: Path, tied: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write a 2-layer Llama (hidden 32, 4 heads of which 2 key-value) as an all-float32 GGUF file at ``path``.

    Returns:
        The weights as a Hugging Face ``LlamaForCausalLM`` holds them: what a faithful reader gives back.
    """
    weights = tiny_llama_state_dict(tied, seed)
    tokens = tiny_vocabulary()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    control, normal = gguf.TokenType.CONTROL, gguf.TokenType.NORMAL
    writer.add_token_types([control if token in SPECIAL_TOKENS else normal for token in tokens])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(EOS_ID)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, tensor in weights.items():
        if tied and name == "lm_head.weight":
            continue
        if name.endswith("q_proj.weight"):
            tensor = llama_cpp_permute(tensor, HEADS)
        elif name.endswith("k_proj.weight"):
            tensor = llama_cpp_permute(tensor, KV_HEADS)
        writer.add_tensor(gguf_name(name), tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights
