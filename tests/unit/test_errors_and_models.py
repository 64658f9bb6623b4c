"""Error classes survive pickling (they cross Ray processes); the model registry validates and teaches."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

from inference import errors
from inference.models import Family, ModelRegistry, ModelSpec

ERROR_CLASSES = [
    errors.InferenceError,
    errors.InvalidInputError,
    errors.InvalidImageError,
    errors.ImageTooLargeError,
    errors.ImageDimensionsError,
    errors.UnknownModelError,
    errors.RequestCancelledError,
    errors.GenerationError,
]


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_every_error_class_survives_a_pickle_round_trip(cls):
    error = cls("something is off", param="strength", value=1.5, details="must be in (0, 1]")
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is cls
    assert (clone.message, clone.code, clone.param, clone.value, clone.details) == (
        "something is off",
        cls.code,
        "strength",
        1.5,
        "must be in (0, 1]",
    )
    assert str(clone) == str(error)


def test_client_and_server_errors_have_separate_roots():
    assert issubclass(errors.ImageTooLargeError, errors.InvalidInputError)
    assert not issubclass(errors.GenerationError, errors.InvalidInputError)


def _registry() -> ModelRegistry:
    return ModelRegistry.from_config(
        [
            {"id": "sd15", "family": "sd", "source": "org/sd15"},
            {"id": "xl", "family": "sdxl", "source": "/models/xl", "dtype": "float16"},
            {"id": "p2p", "family": "instruct-pix2pix", "source": "org/p2p", "scheduler": "euler"},
            {"id": "flux", "family": "flux", "source": "org/flux", "dtype": "bfloat16"},
            {"id": "sd3", "family": "sd3", "source": "org/sd3", "scheduler": "flow_match_euler"},
        ]
    )


def test_unknown_model_is_a_client_error_listing_the_known_ones():
    with pytest.raises(errors.UnknownModelError) as caught:
        _registry().get("sd4")
    assert caught.value.param == "model"
    assert "sd15, xl, p2p, flux, sd3" in caught.value.message


def test_the_first_model_is_the_default():
    assert _registry().get(None).id == "sd15"


@pytest.mark.parametrize(
    ("model_id", "explicit", "ignored"),
    [
        ("sd15", {"prompt_2", "image_guidance_scale", "strength"}, ["image_guidance_scale", "prompt_2"]),
        ("xl", {"prompt_2", "negative_prompt_2", "image_guidance_scale"}, ["image_guidance_scale"]),
        ("p2p", {"strength", "image_guidance_scale", "prompt_2"}, ["prompt_2", "strength"]),
        ("p2p", set(), []),
        (
            "flux",
            {"negative_prompt", "prompt_2", "strength", "image_guidance_scale"},
            ["image_guidance_scale", "negative_prompt"],
        ),
        ("flux", {"negative_prompt_2"}, ["negative_prompt_2"]),
        ("sd3", {"negative_prompt", "prompt_2", "negative_prompt_2", "strength"}, []),
        ("sd3", {"image_guidance_scale"}, ["image_guidance_scale"]),
    ],
)
def test_parameters_a_family_does_not_use_draw_a_warning_only_when_set(model_id, explicit, ignored):
    warnings = _registry().get(model_id).unused_parameter_warnings(explicit)
    assert [w.split("'")[1] for w in warnings] == ignored


def test_describe_lists_defaults_and_honoured_parameters():
    described = _registry().get("p2p").describe()
    assert described["family"] == "instruct-pix2pix"
    assert "image_guidance_scale" in described["honoured_parameters"]
    assert "strength" not in described["honoured_parameters"]


def test_flow_matching_families_describe_their_own_defaults():
    registry = _registry()
    flux, sd3, sd = registry.get("flux"), registry.get("sd3"), registry.get("sd15")
    assert (flux.scheduler, sd3.scheduler, sd.scheduler) == ("flow_match_euler", "flow_match_euler", "ddim")
    assert (flux.default_guidance_scale, sd3.default_guidance_scale, sd.default_guidance_scale) == (
        3.5,
        7.0,
        7.5,
    )
    described = flux.describe()
    assert described["defaults"]["guidance_scale"] == 3.5 and "distilled" in described["guidance"]
    assert "negative_prompt" not in described["honoured_parameters"]
    assert {"prompt_2", "strength", "guidance_scale"} <= set(described["honoured_parameters"])
    assert (
        ModelSpec(id="f", family="flux", source="x", default_guidance_scale=5.0).default_guidance_scale == 5.0
    )


@pytest.mark.parametrize(
    ("family", "scheduler", "fragment"),
    [
        ("flux", "ddim", "use scheduler 'flow_match_euler'"),
        ("sd3", "euler", "flow matching"),
        ("sd", "flow_match_euler", "only for the flow-matching families"),
        ("sdxl", "flow_match_euler", "choose one of 'ddim'"),
    ],
)
def test_flow_match_scheduler_goes_with_flow_matching_families_only(family, scheduler, fragment):
    with pytest.raises(ValueError, match=fragment):
        ModelSpec(id="a", family=family, source="x", scheduler=scheduler)


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ({"id": "a", "family": "dalle", "source": "x"}, "'family'"),
        ({"id": "a", "family": "sd", "source": "x", "dtype": "int8"}, "'dtype'"),
        ({"id": "a", "family": "sd", "source": "x", "scheduler": "magic"}, "'scheduler'"),
        ({"id": "a b", "family": "sd", "source": "x"}, "'id'"),
        ({"id": "a", "family": "sd", "source": "x", "colour": "red"}, "unknown field"),
        ({"id": "a", "family": "sd", "source": ""}, "source"),
    ],
)
def test_bad_model_config_fails_with_a_teaching_error(entry, fragment):
    with pytest.raises(ValueError, match=fragment):
        ModelRegistry.from_config([entry])


def test_duplicate_and_empty_registries_are_refused():
    with pytest.raises(ValueError, match="repeated"):
        ModelRegistry.from_config([{"id": "a", "family": "sd", "source": "x"}] * 2)
    with pytest.raises(ValueError, match="empty"):
        ModelRegistry.from_config([])


def test_family_values():
    assert [f.value for f in Family] == ["sd", "sdxl", "instruct-pix2pix", "flux", "sd3"]
    assert ModelSpec(id="a", family="sd", source="x").family is Family.SD


def test_api_side_modules_do_not_import_torch():
    code = "import inference.images, inference.models, inference.types, inference.errors, sys; "
    code += "assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
