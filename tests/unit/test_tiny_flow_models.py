"""The tiny FLUX.1 and SD3 img2img models (random weights, output is noise): built offline, saved,
reloaded through ``load_pipeline``, and run by the stock diffusers pipelines in every served dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import T5TokenizerFast

from inference.models import Family, ModelSpec
from inference.pipelines import load_pipeline, pipeline_class, run_stock, stock_kwargs
from inference.tiny import (
    TINY_MODEL_IDS,
    build_t5_tokenizer,
    build_tiny_pipeline,
    save_tiny_model,
)
from inference.types import GenerationRequest
from tests.support.engine_requests import engine_request

FLOW = [Family.FLUX, Family.SD3]
DTYPES = ["float32", "float16", "bfloat16"]
#: Loose sanity bounds against float32 (images in [0, 1], 4 steps); the engine's precision tests own
#: the tight ones. They catch a half-precision path that has gone wrong, not rounding noise.
HALF_BOUND = {"float16": 0.05, "bfloat16": 0.15}


def _image(size: int = 64) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([xx, yy, 0.5 + 0.5 * np.sin(6 * xx * yy)], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def _request(family: Family, **kw) -> GenerationRequest:
    kw.setdefault("steps", 4)
    kw.setdefault("guidance_scale", 3.5 if family is Family.FLUX else 5.0)
    return engine_request(
        request_id="r", model=TINY_MODEL_IDS[family], prompt="a photo of a cat", image=_image(), seed=5, **kw
    )


def _spec(family: Family, source, dtype: str = "float32") -> ModelSpec:
    return ModelSpec(id=TINY_MODEL_IDS[family], family=family, source=str(source), dtype=dtype, smoke=True)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: these calls are milliseconds, and two threads on a shared 2-core box run
    several times slower (measured: 34 s for this module, against 8 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def loaded(tiny_model_dirs):
    """(family, dtype) -> the tiny pipeline loaded from its saved folder through load_pipeline."""
    return {(f, d): load_pipeline(_spec(f, tiny_model_dirs[f], d)) for f in FLOW for d in DTYPES}


@pytest.fixture(scope="module")
def float32_outputs(loaded):
    return {f: run_stock(loaded[f, "float32"], f, _request(f), 0, output_type="np") for f in FLOW}


def _ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer(
        prompt, padding="max_length", truncation=True, max_length=tokenizer.model_max_length
    ).input_ids


def test_t5_tokenizer_is_built_offline_and_reloads(tmp_path):
    tok = build_t5_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.model_max_length == 512
    a, b = _ids(tok, "a photo of a cat"), _ids(tok, "A red dog, 3 skies!")
    assert len(a) == len(b) == 512 and a != b
    assert a[:6] == tok("a photo of a cat").input_ids and a[5] == tok.eos_token_id and a[6:] == [0] * 506
    assert tok.unk_token_id not in b  # every ASCII prompt segments into known pieces
    assert len(_ids(tok, "word " * 1000)) == 512
    tok.save_pretrained(tmp_path)
    again = T5TokenizerFast.from_pretrained(tmp_path)
    assert _ids(again, "A red dog, 3 skies!") == b


@pytest.mark.parametrize("family", FLOW, ids=lambda f: f.value)
def test_every_tokenizer_distinguishes_prompts(family, loaded):
    pipe = loaded[family, "float32"]
    names = ["tokenizer", "tokenizer_2"] + (["tokenizer_3"] if family is Family.SD3 else [])
    for name in names:
        tok = getattr(pipe, name)
        a, b = _ids(tok, "a photo of a cat"), _ids(tok, "the dog on the mat")
        assert a != b, f"{family.value}.{name} encodes different prompts alike"
        assert len(set(a)) > 3, f"{family.value}.{name} reads only special tokens"


@pytest.mark.parametrize("family", FLOW, ids=lambda f: f.value)
def test_saved_model_reloads_with_equal_weights_and_its_scheduler(family, loaded):
    built = build_tiny_pipeline(family, seed=0)
    pipe = loaded[family, "float32"]
    assert isinstance(pipe, pipeline_class(family))
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    public = {k: v for k, v in built.scheduler.config.items() if not k.startswith("_")}
    assert {k: pipe.scheduler.config[k] for k in public} == public  # dynamic shifting, shift 3 kept
    assert pipe.scheduler.config.use_dynamic_shifting is (family is Family.FLUX)
    for name, module in built.components.items():
        if isinstance(module, torch.nn.Module):
            theirs = getattr(pipe, name).state_dict()
            for key, value in module.state_dict().items():
                assert torch.equal(value, theirs[key]), f"{family.value}.{name}.{key} differs after reload"
    assert pipe.vae.config.latent_channels == 16 and pipe.vae_scale_factor == 8
    if family is Family.FLUX:
        assert pipe.transformer.config.in_channels == 4 * 16 and pipe.transformer.config.guidance_embeds


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FLOW, ids=lambda f: f.value)
def test_stock_pipeline_runs_in_every_dtype(family, dtype, loaded, float32_outputs):
    pipe = loaded[family, dtype]
    assert pipe.transformer.dtype == getattr(torch, dtype)
    out = run_stock(pipe, family, _request(family), 0, output_type="np")
    assert out.shape == (64, 64, 3) and np.isfinite(out).all()
    assert out.std() > 0.02 and ((out <= 0) | (out >= 1)).mean() < 0.5
    deviation = float(np.abs(out - float32_outputs[family]).max())
    assert deviation <= HALF_BOUND.get(dtype, 0.0), f"{family.value} {dtype}: max |delta| {deviation:.3g}"


def _first_input_ids(module: torch.nn.Module, run) -> torch.Tensor:
    """The input ids of ``module``'s first forward during ``run()`` (the positive prompt's)."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    try:
        run()
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("family", FLOW, ids=lambda f: f.value)
def test_prompt_2_reaches_the_second_encoder(family, loaded, float32_outputs):
    """FLUX: prompt_2 is the T5 prompt. SD3: the second CLIP's (the T5 keeps prompt), as in diffusers."""
    pipe = loaded[family, "float32"]
    with_prompt_2 = _request(family, prompt_2="the dog on the mat")
    outputs = []
    ids = _first_input_ids(
        pipe.text_encoder_2,
        lambda: outputs.append(run_stock(pipe, family, with_prompt_2, 0, output_type="np")),
    )
    plain = _first_input_ids(pipe.text_encoder_2, lambda: run_stock(pipe, family, _request(family), 0))
    expected = pipe.tokenizer_2("the dog on the mat").input_ids
    assert torch.equal(ids[0, : len(expected)].cpu(), torch.tensor(expected))
    assert not torch.equal(ids, plain)
    assert not np.array_equal(outputs[0], float32_outputs[family])


def test_flux_takes_no_negative_prompt_and_sd3_takes_both(loaded):
    flux = stock_kwargs(Family.FLUX, _request(Family.FLUX, negative_prompt="blurry"), 0)
    assert "negative_prompt" not in flux and "negative_prompt_2" not in flux
    assert (flux["height"], flux["width"], flux["guidance_scale"]) == (64, 64, 3.5)
    sd3 = stock_kwargs(Family.SD3, _request(Family.SD3, negative_prompt="a", negative_prompt_2="b"), 0)
    assert (sd3["negative_prompt"], sd3["negative_prompt_2"], sd3["height"]) == ("a", "b", 64)
    pipe = loaded[Family.SD3, "float32"]
    plain = run_stock(pipe, Family.SD3, _request(Family.SD3), 0, output_type="np")
    negative = run_stock(
        pipe, Family.SD3, _request(Family.SD3, negative_prompt="blurry"), 0, output_type="np"
    )
    assert not np.array_equal(plain, negative)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sd3_without_t5_loads_and_runs(dtype, tmp_path, float32_outputs):
    save_tiny_model(Family.SD3, tmp_path / "no-t5", with_t5=False)
    pipe = load_pipeline(_spec(Family.SD3, tmp_path / "no-t5", dtype))
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    out = run_stock(pipe, Family.SD3, _request(Family.SD3), 0, output_type="np")
    assert out.shape == (64, 64, 3) and np.isfinite(out).all() and out.std() > 0.02
    assert not np.allclose(out, float32_outputs[Family.SD3], atol=1e-3)  # the T5 tokens were zeros


def test_with_t5_false_is_only_for_sd3():
    with pytest.raises(ValueError, match="only for family 'sd3'"):
        build_tiny_pipeline(Family.FLUX, with_t5=False)
