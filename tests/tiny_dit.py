"""Tiny randomly initialised DiT pipelines (SD3, PixArt-Sigma, Flux) for CPU tests, built offline from configs.

The transformer configs follow diffusers' own fast tests (``get_dummy_components`` of
test_pipeline_stable_diffusion_3.py, test_pixart.py (sigma) and test_pipeline_flux.py), resized where the
tests here need it (two SD3 layers, so that one joint block returns both streams; a PixArt sample size the
pipeline's resolution binning accepts). Tokenizers are word-level ``PreTrainedTokenizerFast`` objects
(``saeuron.toy.word_tokenizer``) standing in for CLIP and T5 tokenizers, so nothing is downloaded.

``FAMILIES`` maps each family to ``(builder, call kwargs)``: the kwargs give a small image (SD3: 8x8
tokens, PixArt: 8x8, Flux: 8x8 packed tokens) for a pipeline call.
"""
from __future__ import annotations

import torch

from saeuron.toy import word_tokenizer

WORDS = ("an image of a cat dog car tree house in style photo cartoon sketch watercolor oil painting",)


def _clip(tok, with_projection: bool, hidden: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, projection_dim=hidden, max_position_embeddings=tok.model_max_length,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg).eval()


def _t5(tok, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=len(tok), d_model=d_model, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return T5EncoderModel(cfg).eval()


def _vae(latent_channels: int, levels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,) * levels,
                         down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035).eval()


def tiny_sd3(seed: int = 0):
    """StableDiffusion3Pipeline: two joint blocks (the last is ``context_pre_only``), no T5 (SD3 allows that)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=32, pooled_projection_dim=64, out_channels=4).eval()
    tok = word_tokenizer(WORDS)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=_vae(4, 1), text_encoder=_clip(tok, True), tokenizer=tok,
                                    text_encoder_2=_clip(tok, True), tokenizer_2=tok, text_encoder_3=None,
                                    tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pixart(seed: int = 0):
    """PixArtSigmaPipeline with DDIM (integer timesteps); sample size 32 so resolution binning maps 256 px to 256 px."""
    from diffusers import DDIMScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(sample_size=32, num_layers=2, patch_size=4, attention_head_dim=8,
                                           num_attention_heads=3, caption_channels=32, in_channels=4,
                                           cross_attention_dim=24, out_channels=8, attention_bias=True,
                                           activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                           norm_type="ada_norm_single", norm_elementwise_affine=False,
                                           norm_eps=1e-6).eval()
    tok = word_tokenizer(WORDS, max_length=32)
    pipe = PixArtSigmaPipeline(tokenizer=tok, text_encoder=_t5(tok), vae=_vae(4, 4), transformer=transformer,
                               scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux(seed: int = 0):
    """FluxPipeline: one joint and one single block (as diffusers' test), flow matching, no guidance embedding."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]).eval()
    tok = word_tokenizer(WORDS)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(1, 1), text_encoder=_clip(tok, False),
                        tokenizer=tok, text_encoder_2=_t5(tok), tokenizer_2=tok, transformer=transformer,
                        image_encoder=None, feature_extractor=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


FAMILIES = {  # family -> (builder, pipeline call kwargs giving 64 image tokens per sample)
    "sd3": (tiny_sd3, dict(height=16, width=16)),
    "pixart": (tiny_pixart, dict(height=256, width=256, max_sequence_length=16)),
    "flux": (tiny_flux, dict(height=16, width=16, max_sequence_length=16)),
}
