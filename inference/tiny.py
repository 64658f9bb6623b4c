"""Tiny random-weight img2img pipelines, one per family, built fully offline.

SMOKE-TEST MODELS: every weight is random, so the images they produce are noise. They exist so the
service, its tests and a local run exercise the real ``from_pretrained`` / stock-pipeline code path
(text encoders, UNet, VAE, scheduler, classifier-free guidance) without a model hub and in well under a
second per 256x256 image on a laptop CPU. Never serve them as if they were real models: their registry
entries carry ``smoke=True`` and say so in their description.

``python -m inference.tiny OUT_DIR`` writes every family under ``OUT_DIR``.

The flow-matching families (FLUX.1, SD3) keep their real structure at toy widths: 16-channel latents
from an x8 VAE without quant convs (with the real models' scaling and shift factors), FLUX's 2x2 packing
(transformer ``in_channels`` = 4 x 16) with guidance embeds and rotary axes, SD3.5's dual-attention block
and RMS qk-norm, two CLIP encoders plus a T5 encoder whose width is the transformer's joint attention
width, and each family's real scheduler config (FLUX: dynamic shifting by image size; SD3: shift 3).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInstructPix2PixPipeline,
    StableDiffusionXLImg2ImgPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from inference.models import FLOW_MATCH_FAMILIES, FLOW_MATCH_SCHEDULER, Family

#: Folder name (under the root given to ``ensure_tiny_models``) and model id of each family.
TINY_MODEL_IDS: dict[Family, str] = {
    Family.SD: "tiny-sd",
    Family.SDXL: "tiny-sdxl",
    Family.INSTRUCT_PIX2PIX: "tiny-pix2pix",
    Family.FLUX: "tiny-flux",
    Family.SD3: "tiny-sd3",
}

SMOKE_DESCRIPTION = "random-weight smoke-test model: output is noise"

#: Written into every saved folder; its presence also marks the folder as completely written.
README_NAME = "README.txt"
_README = """\
SMOKE-TEST MODEL -- RANDOM WEIGHTS -- OUTPUT IS NOISE

This folder holds a tiny {family} img2img pipeline whose weights are random (seed {seed}). It was
written by `inference.tiny` so the service and its tests can run the real diffusers `from_pretrained`
code path offline and fast. It has learnt nothing: every image it produces is noise. Do not serve it
as a real model.
"""

_HIDDEN = 32  # text encoder width (and projection width of SDXL's second encoder)
_MAX_TOKENS = 77

#: A few merges, enough that the tokenizer does real BPE work. Each merge's result is in the vocab.
_MERGES = (
    "t h",
    "th e</w>",
    "i n",
    "a n",
    "e r",
    "o n</w>",
    "c a",
    "ca t</w>",
    "d o",
    "do g</w>",
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode table (the alphabet of byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _vocab() -> dict[str, int]:
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    tokens += ["".join(m.split()) for m in _MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}


def build_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP BPE tokenizer over a 524-token vocab, loaded the way real ones are.

    transformers 5.x: ``CLIPTokenizer(vocab_file=..., merges_file=...)`` silently ignores the files
    (every prompt becomes start token + padding), so the files go to a folder that is loaded with
    ``from_pretrained``; that folder also needs ``model_max_length`` or truncation overflows.
    """
    with tempfile.TemporaryDirectory(prefix="tiny-tokenizer-") as tmp:
        folder = Path(tmp)
        (folder / "vocab.json").write_text(json.dumps(_vocab(), ensure_ascii=False), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n", encoding="utf-8")
        (folder / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "CLIPTokenizer",
                    "model_max_length": _MAX_TOKENS,
                    "bos_token": "<|startoftext|>",
                    "eos_token": "<|endoftext|>",
                    "unk_token": "<|endoftext|>",
                    "pad_token": "<|endoftext|>",
                    "do_lower_case": True,
                }
            ),
            encoding="utf-8",
        )
        return CLIPTokenizer.from_pretrained(folder)


#: T5 tokenizer: special tokens at T5's ids (pad 0, eos 1, unk 2), the word-start marker, a few whole
#: words, then every printable ASCII character alone and at a word start, so any ASCII prompt segments
#: into known pieces (anything else becomes <unk>). Scores are unigram log-probabilities: whole words
#: beat spelling them out.
_T5_WORDS = ("a", "the", "of", "on", "in", "photo", "painting", "cat", "dog", "mat", "red", "blue", "sky")
_T5_MAX_TOKENS = 512  # real T5 tokenizers' model_max_length; FLUX asks for 512 tokens, SD3 for 256
_T5_WIDTH = 64  # T5 d_model = the transformers' joint_attention_dim; SD3 pads CLIP (32 + 32) up to it


def _t5_vocab() -> list[tuple[str, float]]:
    printable = [chr(c) for c in range(33, 127)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in _T5_WORDS]
    pieces += [("\u2581" + c, -4.0) for c in printable] + [(c, -5.0) for c in printable]
    return list(dict(pieces).items())  # first occurrence wins, order kept


def build_t5_tokenizer() -> T5TokenizerFast:
    """A tiny T5 (SentencePiece-unigram) tokenizer, made without the hub and loaded the way real ones are.

    transformers 5.x's ``T5TokenizerFast`` (= ``T5Tokenizer``) is a ``tokenizers`` Unigram model with
    T5's Metaspace pre-tokenizer and ``$A </s>`` post-processor; given the pieces it builds that
    ``tokenizers.Tokenizer`` itself. It is saved (``tokenizer.json``) and read back with
    ``from_pretrained`` so the object in the pipeline is exactly what a saved folder reloads to.
    """
    tokenizer = T5TokenizerFast(vocab=_t5_vocab(), extra_ids=0, model_max_length=_T5_MAX_TOKENS)
    with tempfile.TemporaryDirectory(prefix="tiny-t5-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        return T5TokenizerFast.from_pretrained(tmp)


def _t5_encoder() -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(
            vocab_size=len(_t5_vocab()),
            d_model=_T5_WIDTH,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",  # T5 v1.1, as FLUX's and SD3's T5-XXL
            is_encoder_decoder=False,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )


def _text_config(vocab: dict[str, int], **extra: Any) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=_MAX_TOKENS,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        hidden_act="quick_gelu",
        **extra,
    )


def _unet(in_channels: int, **extra: Any) -> UNet2DConditionModel:
    kwargs: dict[str, Any] = {
        "sample_size": 32,
        "in_channels": in_channels,
        "out_channels": 4,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": _HIDDEN,
        # (diffusers' legacy name: this is the number of heads.) Two heads of 16/32 channels run ~15%
        # faster on CPU than eight heads of 4/8.
        "attention_head_dim": 2,
        "norm_num_groups": 32,
    }
    kwargs.update(extra)
    return UNet2DConditionModel(**kwargs)


def _vae(**extra: Any) -> AutoencoderKL:
    # Four blocks -> three downsamplings -> the x8 latent grid real SD VAEs have. The full-resolution
    # blocks dominate CPU time, so they are the narrow ones: (16, 16, 32, 64) halves the encode+decode
    # time of (32, 32, 64, 64).
    kwargs: dict[str, Any] = {
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (16, 16, 32, 64),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 256,
    }
    kwargs.update(extra)
    return AutoencoderKL(**kwargs)


_FLOW_LATENT_CHANNELS = 16  # FLUX.1 and SD3 VAEs: 16 latent channels, x8, no quant convs


def _flow_vae(scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    return _vae(
        latent_channels=_FLOW_LATENT_CHANNELS,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )


def _scheduler() -> DDIMScheduler:
    # The SD-1.x scheduler config.
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def _seeded(seed: int, offset: int) -> None:
    torch.manual_seed(seed * 1000 + offset)


def _tiny_flux(seed: int) -> FluxImg2ImgPipeline:
    """FLUX.1-dev's structure: CLIP (pooled) + T5 (sequence), guidance embeds, 2x2-packed latents."""
    vocab = _vocab()
    _seeded(seed, 1)
    text_encoder = CLIPTextModel(_text_config(vocab))
    _seeded(seed, 2)
    text_encoder_2 = _t5_encoder()
    _seeded(seed, 3)
    vae = _flow_vae(scaling_factor=0.3611, shift_factor=0.1159)  # FLUX.1's VAE factors
    _seeded(seed, 4)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * _FLOW_LATENT_CHANNELS,  # 2x2 patches of 16-channel latents, packed as tokens
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_T5_WIDTH,
        pooled_projection_dim=_HIDDEN,  # CLIP's pooled output
        guidance_embeds=True,  # FLUX.1-dev: distilled guidance is an input embedding
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim, as (16, 56, 56) does to 128
    )
    # FLUX.1's scheduler config: the sigma shift grows with the image's token count.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxImg2ImgPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=build_t5_tokenizer(),
        transformer=transformer,
    )


def _tiny_sd3(seed: int, with_t5: bool = True) -> StableDiffusion3Img2ImgPipeline:
    """SD 3.5 Medium's structure: two CLIPs with projections, an optional T5, MMDiT-X blocks."""
    vocab = _vocab()
    _seeded(seed, 1)
    text_encoder = CLIPTextModelWithProjection(_text_config(vocab, projection_dim=_HIDDEN))
    _seeded(seed, 2)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(vocab, projection_dim=_HIDDEN))
    _seeded(seed, 3)
    vae = _flow_vae(scaling_factor=1.5305, shift_factor=0.0609)  # SD3's VAE factors
    _seeded(seed, 4)
    transformer = SD3Transformer2DModel(
        sample_size=32,  # default output 32 x 8 = 256 px
        patch_size=2,
        in_channels=_FLOW_LATENT_CHANNELS,
        out_channels=_FLOW_LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=_T5_WIDTH,  # the T5's width; the CLIPs' 32 + 32 are zero-padded up to it
        caption_projection_dim=32,  # = heads x head dim
        pooled_projection_dim=2 * _HIDDEN,  # both CLIPs' pooled projections, concatenated
        pos_embed_max_size=128,  # 128 patches of 2 latents of 8 px: sides up to 2048 px
        dual_attention_layers=(0,),  # SD3.5's MMDiT-X block, then a plain SD3 block
        qk_norm="rms_norm",
    )
    _seeded(seed, 5)
    text_encoder_3 = _t5_encoder() if with_t5 else None
    return StableDiffusion3Img2ImgPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),  # SD3's config
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=build_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=build_t5_tokenizer() if with_t5 else None,
    )


def build_tiny_pipeline(family: Family | str, seed: int = 0, with_t5: bool = True) -> DiffusionPipeline:
    """A random-weight img2img pipeline of ``family``; same seed, same weights. Output is noise.

    ``with_t5=False`` (SD3 only) leaves the T5 encoder out (``text_encoder_3=None``), as diffusers
    allows: its prompt tokens are then zeros.
    """
    family = Family(family)
    if not with_t5 and family is not Family.SD3:
        raise ValueError(f"with_t5=False is only for family 'sd3', not {family.value!r}")
    if family is Family.FLUX:
        return _ready(_tiny_flux(seed))
    if family is Family.SD3:
        return _ready(_tiny_sd3(seed, with_t5=with_t5))
    vocab = _vocab()
    tokenizer = build_tokenizer()
    _seeded(seed, 1)
    text_encoder = CLIPTextModel(_text_config(vocab))
    _seeded(seed, 3)
    vae = _vae()
    if family is Family.SDXL:
        _seeded(seed, 2)
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(vocab, projection_dim=_HIDDEN))
        _seeded(seed, 4)
        unet = _unet(
            4,
            cross_attention_dim=_HIDDEN + _HIDDEN,  # both encoders' hidden states, concatenated
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            # 6 micro-conditioning numbers x 8 + the pooled projection of encoder 2
            projection_class_embeddings_input_dim=6 * 8 + _HIDDEN,
            transformer_layers_per_block=1,
        )
        pipe: DiffusionPipeline = StableDiffusionXLImg2ImgPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=build_tokenizer(),
            unet=unet,
            scheduler=_scheduler(),
            requires_aesthetics_score=False,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    else:
        pipeline_cls = (
            StableDiffusionImg2ImgPipeline if family is Family.SD else StableDiffusionInstructPix2PixPipeline
        )
        _seeded(seed, 4)
        # instruct-pix2pix concatenates the image latents to the noisy latents: 8 input channels.
        unet = _unet(4 if family is Family.SD else 8)
        pipe = pipeline_cls(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return _ready(pipe)


def _ready(pipe: DiffusionPipeline) -> DiffusionPipeline:
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_model(family: Family | str, folder: Path, seed: int = 0, with_t5: bool = True) -> Path:
    """Build the tiny ``family`` pipeline and ``save_pretrained`` it (safetensors) into ``folder``."""
    family = Family(family)
    folder = Path(folder)
    pipe = build_tiny_pipeline(family, seed=seed, with_t5=with_t5)
    pipe.save_pretrained(folder, safe_serialization=True)
    (folder / README_NAME).write_text(_README.format(family=family.value, seed=seed), encoding="utf-8")
    return folder


def _is_complete(folder: Path) -> bool:
    return (folder / "model_index.json").is_file() and (folder / README_NAME).is_file()


def ensure_tiny_models(root: Path, seed: int = 0) -> dict[Family, Path]:
    """Make sure ``root/tiny-<family>`` holds each tiny model; build only what is missing.

    Idempotent, and safe against a crash mid-write or a concurrent builder: each model is written to a
    temporary folder beside its target and renamed into place only once complete, so a target folder
    either is whole or does not exist (a leftover incomplete one is removed and rebuilt).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    folders: dict[Family, Path] = {}
    for family, model_id in TINY_MODEL_IDS.items():
        target = root / model_id
        folders[family] = target
        if _is_complete(target):
            continue
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        tmp = root / f".{model_id}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            save_tiny_model(family, tmp, seed=seed)
            try:
                os.rename(tmp, target)
            except OSError:
                if not _is_complete(target):  # not a concurrent builder that won the race
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folders


def tiny_model_specs(root: Path) -> list[dict[str, Any]]:
    """Model config entries (for ``ModelRegistry.from_config``) for the tiny models under ``root``.

    They do not build anything: call ``ensure_tiny_models(root)`` first. tiny-sd comes first so it is
    the registry's default model.
    """
    root = Path(root)
    return [
        {
            "id": model_id,
            "family": family.value,
            "source": str(root / model_id),
            "smoke": True,
            "description": SMOKE_DESCRIPTION,
            "scheduler": FLOW_MATCH_SCHEDULER if family in FLOW_MATCH_FAMILIES else "ddim",
        }
        for family, model_id in TINY_MODEL_IDS.items()
    ]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in {"-h", "--help"}:
        print("usage: python -m inference.tiny OUT_DIR")
        print("Writes tiny random-weight smoke-test models (their output is noise) under OUT_DIR.")
        return 2
    for family, folder in ensure_tiny_models(Path(argv[0])).items():
        print(f"{family.value}: {folder}  (random-weight smoke-test model: output is noise)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
