"""The tiny random-weight models (output is noise) and the stock-pipeline oracle, all offline and fast."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from inference.errors import GenerationError
from inference.models import Family, ModelRegistry, ModelSpec
from inference.pipelines import load_pipeline, pipeline_class, run_stock, run_stock_request
from inference.tiny import (
    README_NAME,
    TINY_MODEL_IDS,
    build_tiny_pipeline,
    build_tokenizer,
    ensure_tiny_models,
    tiny_model_specs,
)
from inference.types import GenerationRequest
from tests.support.engine_requests import engine_request

FAMILIES = list(Family)


@pytest.fixture(scope="module")
def pipes(tiny_registry):
    return {spec.family: load_pipeline(spec) for spec in tiny_registry.specs}


def _image(size: int = 64, seed: int = 0) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size] / size
    rng = np.random.default_rng(seed)
    rgb = np.stack([xx, yy, 0.5 + 0.5 * np.sin(6 * xx * yy)], axis=-1) + rng.normal(0, 0.05, (size, size, 3))
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))


def _request(family: Family, seed: int = 1, size: int = 64, **kw) -> GenerationRequest:
    kw.setdefault("steps", 4)
    return engine_request(
        request_id="r",
        model=TINY_MODEL_IDS[family],
        prompt="a cat on the mat",
        image=_image(size),
        seed=seed,
        **kw,
    )


def test_tokenizer_distinguishes_prompts():
    tok = build_tokenizer()
    a = tok("a cat", padding="max_length", truncation=True, max_length=tok.model_max_length).input_ids
    b = tok("the dog", padding="max_length", truncation=True, max_length=tok.model_max_length).input_ids
    assert len(a) == len(b) == 77
    assert a != b
    assert a[0] == b[0] == tok.bos_token_id
    assert len(set(a)) > 2  # more than start + padding: the vocab files were really read
    long = tok("word " * 200, padding="max_length", truncation=True, max_length=77).input_ids
    assert len(long) == 77


def test_specs_are_valid_smoke_entries(tiny_registry, tiny_model_dirs):
    assert tiny_registry.ids == ("tiny-sd", "tiny-sdxl", "tiny-pix2pix", "tiny-flux", "tiny-sd3")
    assert tiny_registry.default.id == "tiny-sd"
    for spec in tiny_registry.specs:
        assert spec.smoke and "noise" in spec.description
        assert spec.source == str(tiny_model_dirs[spec.family])
        flow = spec.family in (Family.FLUX, Family.SD3)
        assert spec.scheduler == ("flow_match_euler" if flow else "ddim")
        assert "noise" in (tiny_model_dirs[spec.family] / README_NAME).read_text().lower()


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.value)
def test_saved_model_loads_back_with_equal_weights(family, tiny_registry, pipes):
    built = build_tiny_pipeline(family, seed=0)
    loaded = pipes[family]
    assert isinstance(loaded, pipeline_class(family))
    flow = family in (Family.FLUX, Family.SD3)
    assert type(loaded.scheduler).__name__ == ("FlowMatchEulerDiscreteScheduler" if flow else "DDIMScheduler")
    for name, module in built.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        other = getattr(loaded, name)
        assert not other.training
        theirs = other.state_dict()
        for key, value in module.state_dict().items():
            assert torch.equal(value, theirs[key]), f"{family.value}.{name}.{key} differs after reload"


def test_different_seed_gives_different_weights():
    a = build_tiny_pipeline(Family.SD, seed=0).unet.conv_in.weight
    b = build_tiny_pipeline(Family.SD, seed=1).unet.conv_in.weight
    assert not torch.equal(a, b)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.value)
def test_run_stock_is_sized_deterministic_and_not_degenerate(family, pipes):
    pipe = pipes[family]
    request = _request(family, seed=7, negative_prompt="blurry")
    first = run_stock(pipe, family, request, 0)
    assert isinstance(first, Image.Image) and first.size == (64, 64)
    again = run_stock(pipe, family, request, 0)
    assert np.array_equal(np.asarray(first), np.asarray(again))

    other = run_stock(pipe, family, _request(family, seed=8, negative_prompt="blurry"), 0)
    assert not np.array_equal(np.asarray(first), np.asarray(other))

    pixels = np.asarray(first, dtype=np.float32) / 255.0
    assert pixels.std() > 0.02
    assert ((pixels == 0) | (pixels == 1)).mean() < 0.5


def test_run_stock_request_uses_one_seed_per_image(pipes):
    family = Family.SD
    pipe = pipes[family]
    request = _request(family, seed=3, num_images=2)
    images = run_stock_request(pipe, family, request)
    assert len(images) == 2
    # image 1 of a request with seed 3 is image 0 of a request with seed 4, generated alone
    alone = run_stock(pipe, family, _request(family, seed=4), 0)
    assert np.array_equal(np.asarray(images[1]), np.asarray(alone))
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))
    latents = run_stock(pipe, family, request, 0, output_type="latent")
    assert tuple(latents.shape) == (4, 8, 8)


def test_run_stock_honours_family_parameters(pipes):
    sd = run_stock(pipes[Family.SD], Family.SD, _request(Family.SD, strength=0.5), 0, output_type="np")
    sd2 = run_stock(pipes[Family.SD], Family.SD, _request(Family.SD, strength=0.9), 0, output_type="np")
    assert not np.array_equal(sd, sd2)
    p2p = Family.INSTRUCT_PIX2PIX
    a = run_stock(pipes[p2p], p2p, _request(p2p, image_guidance_scale=1.0), 0, output_type="np")
    b = run_stock(pipes[p2p], p2p, _request(p2p, image_guidance_scale=2.0), 0, output_type="np")
    assert not np.array_equal(a, b)
    xl = Family.SDXL
    c = run_stock(pipes[xl], xl, _request(xl), 0, output_type="np")
    d = run_stock(pipes[xl], xl, _request(xl, prompt_2="a dog"), 0, output_type="np")
    assert not np.array_equal(c, d)


def test_ensure_tiny_models_is_idempotent_and_repairs(tmp_path, tiny_model_dirs):
    root = next(iter(tiny_model_dirs.values())).parent
    before = {f: (p / "model_index.json").stat().st_mtime_ns for f, p in tiny_model_dirs.items()}
    assert ensure_tiny_models(root) == tiny_model_dirs
    assert {f: (p / "model_index.json").stat().st_mtime_ns for f, p in tiny_model_dirs.items()} == before

    # a half-written folder (no model_index.json / README) is rebuilt, not trusted
    partial = tmp_path / "tiny-sd"
    (partial / "unet").mkdir(parents=True)
    (partial / "unet" / "config.json").write_text("{}")
    only_sd = ensure_tiny_models(tmp_path)
    assert (only_sd[Family.SD] / "model_index.json").is_file()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp folders left behind


def test_missing_source_folder_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    spec = ModelSpec(id="gone", family="sd", source=str(missing))
    with pytest.raises(GenerationError) as info:
        load_pipeline(spec)
    assert str(missing) in str(info.value) and "does not exist" in str(info.value)
    assert info.value.code == "model_load_failed" and info.value.param == "source"


def test_unknown_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = ModelSpec(id="hub", family="sd", source="no-such-org/no-such-model")
    with pytest.raises(GenerationError) as info:
        load_pipeline(spec)
    assert "no-such-org/no-such-model" in str(info.value)


def test_registry_accepts_specs(tmp_path):
    registry = ModelRegistry.from_config(tiny_model_specs(tmp_path))
    assert [s.family for s in registry.specs] == FAMILIES
