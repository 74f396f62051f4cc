"""The registry of methods (bd.methods): every list of methods elsewhere agrees with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bd.methods import Method, colour_of, default_missing_kinds, get_method, label_of, list_methods, register_method

ROOT = Path(__file__).resolve().parents[1]


def test_the_model_registry_has_exactly_the_registered_methods():
    from bd.mil.models import MODELS

    assert sorted(MODELS) == sorted(list_methods())


def test_the_config_schema_lists_the_registered_methods():
    schema = yaml.safe_load((ROOT / "bd" / "schemas" / "config.schema.yaml").read_text())
    enum = schema["properties"]["training"]["properties"]["methods"]["items"]["enum"]
    assert enum == list_methods()


def test_defaults_come_from_the_registry():
    from bd.evaluation.evaluate import EvaluationParams
    from bd.mil.train import TrainParams

    assert TrainParams().methods == ["image_only", "clinical_only", "filling", "ae", "ensemble", "smil", "bd",
                                    "modality_dropout"]
    assert EvaluationParams().missing_kinds == {"bd_wsi": ["slide"], "filling": ["clinical", "slide"],
                                                "clinical_only": ["clinical", "slide"]}
    assert default_missing_kinds() == EvaluationParams().missing_kinds


def test_figure_and_target_lists_keep_their_order():
    assert list_methods(figure="fig1") == ["image_only", "filling", "bd", "modality_dropout"]
    assert list_methods(figure="wsi_missing") == ["bd_wsi", "filling", "clinical_only"]
    assert list_methods(figure="heatmaps") == ["bd", "filling", "image_only", "ensemble", "ae", "smil"]
    assert list_methods(role="reference") == ["image_only", "clinical_only"]
    assert list_methods(role="baseline") == ["filling"]


def test_labels_and_colours_with_a_fallback_for_unknown_names():
    assert label_of("bd") == "BD" and colour_of("filling") == "tab:green"
    assert label_of("mine") == "mine" and colour_of("mine", 12) == "C2"
    assert get_method("mine") is None


def test_a_method_is_registered_once_and_has_a_known_role():
    with pytest.raises(ValueError, match="twice"):
        register_method(Method("bd", "BD", "tab:red", "proposed"))
    with pytest.raises(ValueError, match="role"):
        Method("x", "X", "k", "star")


def test_the_public_api_resolves_every_name():
    import bd

    assert all(getattr(bd, name) is not None for name in bd.__all__)
    with pytest.raises(AttributeError):
        bd.nothing_here  # noqa: B018
