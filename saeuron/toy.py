"""Diffusers pipelines built from configs with random weights: no download, any size.

Used by the tests, the benchmarks (the SD1.5 UNet config) and the smoke stages of the demo.
Timing does not depend on the weights, and every hook sees real shapes.
"""
from __future__ import annotations

import re
from typing import Iterable, Optional

import torch

SPECIAL = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")


def word_tokenizer(words: Iterable[str], max_length: int = 16):
    """A word-level ``PreTrainedTokenizerFast``: lower-cased words, punctuation dropped, BOS/EOS added."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL)}
    for w in sorted({w.lower() for text in words for w in re.findall(r"[A-Za-z0-9']+", text)}):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation("removed")])
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, pad_token="[PAD]",
                                   unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]")


SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)


def tiny_unet_config(channels=(32, 64), cross_attention_dim: int = 32, sample_size: int = 8) -> dict:
    """A UNet2DConditionModel config with cross-attention Transformer2DModel blocks at every level but the last."""
    n = len(channels)
    return dict(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(channels),
        down_block_types=tuple(["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"]),
        up_block_types=tuple(["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1)),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8,
    )


def tiny_pipeline(words: Iterable[str] = ("an image of a cat dog car tree in style photo",), seed: int = 0,
                  unet_config: Optional[dict] = None, dtype=torch.float32):
    """A random ``StableDiffusionPipeline`` small enough for CPU tests (8x8 latents -> 64x64 images).

    The VAE is a tiny AutoencoderKL and the scheduler DDIM.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    ucfg = unet_config or tiny_unet_config()
    unet = UNet2DConditionModel(**ucfg)
    tok = word_tokenizer(words)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=ucfg["cross_attention_dim"], intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=tok.model_max_length,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    vae_model = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=8, sample_size=ucfg["sample_size"] * 8)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae_model, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def random_sae(d_in: int = 32, num_latents: int = 128, k: int = 4, seed: int = 0, dtype=torch.float32):
    """A random SparseAutoencoder with non-trivial biases (never zeros), for tests and benchmarks."""
    from .sae import SaeConfig, SparseAutoencoder

    g = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(SaeConfig(d_in=d_in, num_latents=num_latents, k=k))
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.randn(num_latents, d_in, generator=g) / d_in ** 0.5)
        sae.encoder.bias.copy_(torch.randn(num_latents, generator=g) * 0.1)
        sae.W_dec.copy_(torch.randn(num_latents, d_in, generator=g))
        sae.set_decoder_norm_to_unit_norm()
        sae.b_dec.copy_(torch.randn(d_in, generator=g) * 0.1)
    return sae.to(dtype)
