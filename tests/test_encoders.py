"""Encoders: timm models by name, truncated after a stage, weights from a local file only."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import timm
import torch

from bd.encoders import create_encoder
from bd.io import file_sha256
from bd.errors import ConfigError


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full resnet18 state_dict (random, but not timm's default init for the test's seed)."""
    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("w") / "resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    return path


def test_truncated_encoder_pools_the_stage_output(resnet18_weights: Path) -> None:
    """layer2 of resnet18 + global average pooling = timm's own features_only output, pooled."""
    encoder, config = create_encoder("resnet18", "layer2", resnet18_weights)
    assert encoder.feature_dim == 128
    assert config["mean"] == pytest.approx((0.485, 0.456, 0.406))
    reference = timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=(2,))
    reference.load_state_dict(torch.load(resnet18_weights), strict=False)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = reference.eval()(x)[0].mean(dim=(2, 3))
        torch.testing.assert_close(encoder(x), expected)
    assert not any(name.startswith(("layer3", "layer4", "fc")) for name in encoder.model.state_dict())


def test_full_model_when_out_stage_is_null(resnet18_weights: Path) -> None:
    encoder, _ = create_encoder("resnet18", None, resnet18_weights)
    assert encoder.feature_dim == 512
    with torch.no_grad():
        assert encoder(torch.randn(2, 3, 64, 64)).shape == (2, 512)


def test_weights_sha256_is_recorded(resnet18_weights: Path) -> None:
    encoder, _ = create_encoder("resnet18", "layer1", resnet18_weights)
    assert encoder.weights_id == file_sha256(resnet18_weights)
    assert len(encoder.weights_id) == 64


def test_wrapped_and_truncated_checkpoints_load(resnet18_weights: Path, tmp_path: Path) -> None:
    """A timm/DDP checkpoint ({'state_dict': {'module.<key>': ...}}) without the pruned layers."""
    state = torch.load(resnet18_weights)
    kept = {f"module.{k}": v for k, v in state.items() if not k.startswith(("layer3", "layer4", "fc"))}
    path = tmp_path / "trunc.pth.tar"
    torch.save({"state_dict": kept, "epoch": 3}, path)
    a, _ = create_encoder("resnet18", "layer2", path)
    b, _ = create_encoder("resnet18", "layer2", resnet18_weights)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


def test_weights_missing_a_kept_layer_fail(resnet18_weights: Path, tmp_path: Path) -> None:
    state = {k: v for k, v in torch.load(resnet18_weights).items() if not k.startswith("layer2")}
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(ConfigError, match=r"features\.weights.*missing.*layer2"):
        create_encoder("resnet18", "layer2", path)
    create_encoder("resnet18", "layer1", path)  # layer2 is pruned there: fine


def test_weights_of_another_model_fail(resnet18_weights: Path) -> None:
    with pytest.raises(ConfigError, match=r"features\.weights"):
        create_encoder("resnet34", "layer2", resnet18_weights)


def test_missing_weights_file_and_no_weights_fail(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"features\.weights.*does not exist"):
        create_encoder("resnet18", "layer1", tmp_path / "nope.pth")
    with pytest.raises(ConfigError, match=r"features\.weights.*random_weights"):
        create_encoder("resnet18", "layer1")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"features\.weights: cannot read"):
        create_encoder("resnet18", "layer1", garbage)


def test_random_weights_warn_and_are_reproducible(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="bd.encoders"):
        a, _ = create_encoder("resnet18", "layer1", random_weights=True)
    assert "RANDOM weights" in caplog.text and a.weights_id == "random"
    torch.manual_seed(999)  # the global RNG must not matter
    b, _ = create_encoder("resnet18", "layer1", random_weights=True)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_bad_names_list_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"features\.out_stage.*act1, layer1, layer2, layer3, layer4"):
        create_encoder("resnet18", "layer9", random_weights=True)
    with pytest.raises(ConfigError, match=r"features\.encoder.*resnet_nope"):
        create_encoder("resnet_nope", None, random_weights=True)
