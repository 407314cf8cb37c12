"""Tiny randomly initialised Hugging Face models for tests (no downloads).

Every factory builds its model from a config with the smallest sizes that the
config allows, seeds ``torch.manual_seed(0)``, and returns the model in train
mode, on CPU, in float32.  The docstrings name the dotted paths of the stacks
(decoder layers, vision blocks, audio blocks) so tests can refer to them.

``qwen2_5_vl_batch(model)`` and ``llava_batch(model)`` return keyword arguments
for one forward pass with one small image such that
``model(**batch).loss.backward()`` works.
"""

from __future__ import annotations

import torch

_VOCAB = 256


def _finish(model: torch.nn.Module) -> torch.nn.Module:
    return model.to(device="cpu", dtype=torch.float32).train()


# --------------------------------------------------------------------------- #
# Qwen2.5-VL
# --------------------------------------------------------------------------- #
_QWEN_IMAGE_TOKEN = 250
_QWEN_VIDEO_TOKEN = 251
_QWEN_VISION_START = 252
_QWEN_VISION_END = 253


def qwen2_5_vl():
    """Qwen2_5_VLForConditionalGeneration, tiny.

    Language decoder layers: ``model.language_model.layers`` (2 x Qwen2_5_VLDecoderLayer).
    Vision blocks: ``model.visual.blocks`` (4 x Qwen2_5_VLVisionBlock), merger at
    ``model.visual.merger``.  Patch size 4, temporal patch 2, spatial merge 2: a
    16x16 image gives a 4x4 patch grid and 4 image tokens (see ``qwen2_5_vl_batch``).
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=_VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            max_window_layers=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        vision_config=dict(
            depth=4,
            hidden_size=32,
            intermediate_size=64,
            num_heads=4,
            patch_size=4,
            temporal_patch_size=2,
            spatial_merge_size=2,
            window_size=16,
            out_hidden_size=32,
            fullatt_block_indexes=[1, 3],
        ),
        image_token_id=_QWEN_IMAGE_TOKEN,
        video_token_id=_QWEN_VIDEO_TOKEN,
        vision_start_token_id=_QWEN_VISION_START,
        vision_end_token_id=_QWEN_VISION_END,
    )
    return _finish(Qwen2_5_VLForConditionalGeneration(config))


def qwen2_5_vl_batch(model, image_size: int = 16):
    """One forward's kwargs for ``qwen2_5_vl()``: one ``image_size`` x ``image_size`` image.

    pixel_values are the processor's flattened patches: (t*h*w, C*T*P*P) with
    image_grid_thw = [[1, h, w]] and h = w = image_size // patch_size; the text
    holds h*w / merge**2 image placeholder tokens between vision start/end tokens.
    """
    vision = model.config.vision_config
    patch, temporal, merge = vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size
    grid = image_size // patch
    assert grid % merge == 0, "image_size must be a multiple of patch_size * spatial_merge_size"
    n_patches = grid * grid
    n_image_tokens = n_patches // (merge * merge)
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(n_patches, vision.in_channels * temporal * patch * patch, generator=generator)
    config = model.config
    input_ids = torch.tensor(
        [
            [5, 6, config.vision_start_token_id]
            + [config.image_token_id] * n_image_tokens
            + [config.vision_end_token_id, 7, 8, 9]
        ]
    )
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": pixel_values,
        "image_grid_thw": torch.tensor([[1, grid, grid]]),
        "labels": input_ids.clone(),
    }


# --------------------------------------------------------------------------- #
# Qwen3-VL and Qwen3-VL-MoE
# --------------------------------------------------------------------------- #
def _qwen3_vision(**extra):
    return dict(
        depth=4,
        hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        patch_size=4,
        temporal_patch_size=2,
        spatial_merge_size=2,
        out_hidden_size=32,
        num_position_embeddings=64,
        deepstack_visual_indexes=[1, 2],
        **extra,
    )


def _qwen3_settings(**text_extra):
    """Qwen3-VL's config settings, tiny; ``text_extra`` adds to the text config (the MoE's experts)."""
    return dict(
        text_config=dict(
            vocab_size=_VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=256,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [1, 1, 2],
                "mrope_interleaved": True,
            },
            **text_extra,
        ),
        vision_config=_qwen3_vision(),
        image_token_id=_QWEN_IMAGE_TOKEN,
        video_token_id=_QWEN_VIDEO_TOKEN,
        vision_start_token_id=_QWEN_VISION_START,
        vision_end_token_id=_QWEN_VISION_END,
    )


def qwen3_vl():
    """Qwen3VLForConditionalGeneration, tiny.

    Language decoder layers: ``model.language_model.layers`` (2 x Qwen3VLTextDecoderLayer).
    Vision blocks: ``model.visual.blocks`` (4 x Qwen3VLVisionBlock); deepstack mergers at
    ``model.visual.deepstack_merger_list`` (2, after vision blocks 1 and 2).
    """
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    config = Qwen3VLConfig(**_qwen3_settings())
    return _finish(Qwen3VLForConditionalGeneration(config))


def qwen3_vl_moe():
    """Qwen3VLMoeForConditionalGeneration, tiny (4 experts, top-2, every layer sparse).

    Language decoder layers: ``model.language_model.layers`` (2 x Qwen3VLMoeTextDecoderLayer,
    each ``.mlp`` a Qwen3VLMoeTextSparseMoeBlock whose experts are fused 3-D parameters).
    Vision blocks: ``model.visual.blocks`` (4 x Qwen3VLMoeVisionBlock).
    """
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    torch.manual_seed(0)
    config = Qwen3VLMoeConfig(
        **_qwen3_settings(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1)
    )
    return _finish(Qwen3VLMoeForConditionalGeneration(config))


# --------------------------------------------------------------------------- #
# Gemma 3 (SigLIP vision + Gemma3 text)
# --------------------------------------------------------------------------- #
def gemma3_vlm():
    """Gemma3ForConditionalGeneration, tiny (32x32 images, patch 8, 4 tokens per image).

    Language decoder layers: ``model.language_model.layers`` (2 x Gemma3DecoderLayer).
    Vision blocks: ``model.vision_tower.encoder.layers`` (2 x SiglipEncoderLayer).
    Projector: ``model.multi_modal_projector``.  Output embeddings tied to input embeddings.
    """
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    config = Gemma3Config(
        text_config=dict(
            vocab_size=_VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            query_pre_attn_scalar=8,
            max_position_embeddings=256,
            sliding_window=16,
        ),
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            vision_use_head=False,
        ),
        mm_tokens_per_image=4,
        boi_token_index=252,
        eoi_token_index=253,
        image_token_index=250,
    )
    return _finish(Gemma3ForConditionalGeneration(config))


# --------------------------------------------------------------------------- #
# LLaVA with Qwen2 text and SigLIP vision (LLaVA-OneVision-like proportions)
# --------------------------------------------------------------------------- #
_LLAVA_IMAGE_TOKEN = 250


def llava_qwen2_siglip():
    """LlavaForConditionalGeneration with a Qwen2 text config and a SigLIP vision config.

    Sized like LLaVA-OneVision-0.5B (SigLIP-so400m + Qwen2-0.5B): the vision tower
    (hidden 64, 4 layers) holds more parameters than the language layers (hidden 32, 2 layers).
    32x32 images, patch 8: 16 image tokens ("full" feature strategy, last vision layer).

    Language decoder layers: ``model.language_model.layers`` (2 x Qwen2DecoderLayer).
    Vision blocks: ``model.vision_tower.encoder.layers`` (4 x SiglipEncoderLayer).
    Projector: ``model.multi_modal_projector``.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    config = LlavaConfig(
        text_config=dict(
            model_type="qwen2",
            vocab_size=_VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
        ),
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            vision_use_head=False,
        ),
        image_token_index=_LLAVA_IMAGE_TOKEN,
        image_seq_length=16,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        tie_word_embeddings=True,
    )
    return _finish(LlavaForConditionalGeneration(config))


def llava_batch(model):
    """One forward's kwargs for ``llava_qwen2_siglip()``: one image, its placeholder tokens, labels."""
    vision = model.config.vision_config
    n_image_tokens = (vision.image_size // vision.patch_size) ** 2
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(1, vision.num_channels, vision.image_size, vision.image_size, generator=generator)
    input_ids = torch.tensor([[5, 6] + [model.config.image_token_index] * n_image_tokens + [7, 8, 9]])
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": pixel_values,
        "labels": input_ids.clone(),
    }


# --------------------------------------------------------------------------- #
# Idefics3 (SigLIP-like vision + Llama text)
# --------------------------------------------------------------------------- #
def idefics3():
    """Idefics3ForConditionalGeneration, tiny (32x32 images, patch 8, scale factor 2).

    Language decoder layers: ``model.text_model.layers`` (2 x LlamaDecoderLayer).
    Vision blocks: ``model.vision_model.encoder.layers`` (2 x Idefics3EncoderLayer).
    Connector: ``model.connector``.
    """
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    torch.manual_seed(0)
    config = Idefics3Config(
        text_config=dict(
            model_type="llama",
            vocab_size=_VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        image_token_id=250,
        scale_factor=2,
    )
    return _finish(Idefics3ForConditionalGeneration(config))


# --------------------------------------------------------------------------- #
# Mllama (Llama 3.2 Vision)
# --------------------------------------------------------------------------- #
def mllama():
    """MllamaForConditionalGeneration, tiny; text layers 1 and 3 are cross-attention layers.

    Language decoder layers: ``model.language_model.layers`` (4: MllamaSelfAttentionDecoderLayer
    at 0 and 2, MllamaCrossAttentionDecoderLayer at 1 and 3).
    Vision blocks: ``model.vision_model.transformer.layers`` (2 x MllamaVisionEncoderLayer) and
    ``model.vision_model.global_transformer.layers`` (1 gated MllamaVisionEncoderLayer).
    Projector: ``model.multi_modal_projector``.
    """
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    torch.manual_seed(0)
    vision_hidden = 32
    intermediate_layers_indices = [0, 1]
    config = MllamaConfig(
        text_config=dict(
            vocab_size=_VOCAB + 8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            cross_attention_layers=[1, 3],
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=vision_hidden,
            intermediate_size=64,
            num_hidden_layers=2,
            num_global_layers=1,
            attention_heads=4,
            image_size=32,
            patch_size=8,
            max_num_tiles=4,
            intermediate_layers_indices=intermediate_layers_indices,
            vision_output_dim=vision_hidden * (len(intermediate_layers_indices) + 1),
        ),
        image_token_index=_VOCAB + 1,
    )
    return _finish(MllamaForConditionalGeneration(config))


# --------------------------------------------------------------------------- #
# Phi-4-multimodal (SigLIP-like vision + Conformer audio + Phi3-like text)
# --------------------------------------------------------------------------- #
def phi4_multimodal():
    """Phi4MultimodalForCausalLM, tiny, with its image and audio encoders.

    Language decoder layers: ``model.layers`` (2 x Phi4MultimodalDecoderLayer).
    Vision blocks: ``model.embed_tokens_extend.image_embed.img_processor.encoder.layers``
    (2 x Phi4MultimodalVisionEncoderLayer).
    Audio blocks: ``model.embed_tokens_extend.audio_embed.encoder.encoders``
    (2 x Phi4MultimodalAudioConformerEncoderLayer).
    """
    from transformers import Phi4MultimodalConfig, Phi4MultimodalForCausalLM

    torch.manual_seed(0)
    config = Phi4MultimodalConfig(
        vocab_size=_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        original_max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            crop_size=32,
            image_token_id=250,
        ),
        audio_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_blocks=2,
            num_attention_heads=4,
            ext_pw_out_channel=32,
            depthwise_separable_out_channel=32,
            nemo_conv_channels=16,
            input_size=16,
            time_reduction=2,
            left_chunk=2,
            bias_max_distance=16,
            audio_token_id=251,
        ),
    )
    return _finish(Phi4MultimodalForCausalLM(config))


# --------------------------------------------------------------------------- #
# T5
# --------------------------------------------------------------------------- #
def t5():
    """T5ForConditionalGeneration, tiny (2 encoder blocks, 2 decoder blocks).

    Encoder blocks: ``encoder.block`` (2 x T5Block); decoder blocks: ``decoder.block``
    (2 x T5Block).  ``shared`` is the embedding; transformers 5 always ties
    ``encoder.embed_tokens``, ``decoder.embed_tokens`` and ``lm_head`` to ``shared.weight``.
    """
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=_VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return _finish(T5ForConditionalGeneration(config))


# --------------------------------------------------------------------------- #
# Zamba2 (Mamba2 layers + one shared transformer block used by hybrid layers)
# --------------------------------------------------------------------------- #
def zamba2():
    """Zamba2ForCausalLM, tiny: 6 layers, hybrid at indices 1, 3, 5 sharing one transformer block.

    Layers: ``model.layers`` (6: Zamba2MambaDecoderLayer at 0, 2, 4; Zamba2HybridLayer at
    1, 3, 5).  Each hybrid layer's ``.shared_transformer`` is the same module object
    (num_mem_blocks=1), so its parameters are shared by layers 1, 3 and 5; the hybrid
    layers own their ``.linear`` and ``.mamba_decoder``.  Note that the shared block's
    ``feed_forward.gate_up_proj_adapter_list`` holds one LoRA-like adapter per hybrid
    layer (rank 8): registered in the shared module, but adapter i is used only by the
    i-th hybrid layer.  Without mamba-ssm installed the
    pure-PyTorch Mamba path is used.
    """
    from transformers import Zamba2Config, Zamba2ForCausalLM

    torch.manual_seed(0)
    config = Zamba2Config(
        vocab_size=_VOCAB,
        hidden_size=32,
        num_hidden_layers=6,
        layers_block_type=["mamba", "hybrid", "mamba", "hybrid", "mamba", "hybrid"],
        mamba_d_state=8,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_ngroups=1,
        n_mamba_heads=4,
        chunk_size=16,
        intermediate_size=64,
        num_attention_heads=4,
        num_mem_blocks=1,
        use_shared_attention_adapter=False,
        adapter_rank=8,
        max_position_embeddings=256,
    )
    return _finish(Zamba2ForCausalLM(config))


FACTORIES = {
    "qwen2_5_vl": qwen2_5_vl,
    "qwen3_vl": qwen3_vl,
    "qwen3_vl_moe": qwen3_vl_moe,
    "gemma3_vlm": gemma3_vlm,
    "llava_qwen2_siglip": llava_qwen2_siglip,
    "idefics3": idefics3,
    "mllama": mllama,
    "phi4_multimodal": phi4_multimodal,
    "t5": t5,
    "zamba2": zamba2,
}
