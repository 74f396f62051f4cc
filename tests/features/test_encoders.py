"""Encoders: timm models by name, truncated after a stage, weights from a local file only."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import timm
import torch

from bd.features.encoders import create_encoder
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
    with caplog.at_level(logging.WARNING, logger="bd.features.encoders"):
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


# --- foundation encoders: presets, model_kwargs, normalisation, checkpoint layouts, offline hub ---

from bd.features.encoders import PRESETS, layer_kwargs  # noqa: E402

DATA = Path(__file__).parents[1] / "data"
# Each preset's checkpoint is written in one of the published forms: file type and wrapping.
LAYOUTS = {"uni": ("pytorch_model.bin", "bare"), "uni2-h": ("uni2.pth", "state_dict"),
           "virchow2": ("model.safetensors", "bare"), "h-optimus-0": ("checkpoint.pth", "module"),
           "phikon-v2": ("model.safetensors", "transformers")}


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test (HF_HUB_OFFLINE set as on a compute node)."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def perturbed(model: torch.nn.Module, seed: int = 5) -> torch.nn.Module:
    """``model`` with every parameter moved off its init (LayerScale 1e-5 would hide the blocks)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return model.eval()


def timm_to_dinov2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of bd's mapping, written out independently: timm ViT keys -> transformers DINOv2."""
    out = {"embeddings.mask_token": torch.zeros_like(state["cls_token"][0])}
    names = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
             "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
             "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
             "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
    for key, value in state.items():
        if key in names:
            out[names[key]] = value
            continue
        _, i, rest = key.split(".", 2)
        base = f"encoder.layer.{i}."
        if rest.startswith("attn.qkv."):
            kind = rest.rsplit(".", 1)[1]
            for part, chunk in zip(("query", "key", "value"), value.chunk(3)):
                out[f"{base}attention.attention.{part}.{kind}"] = chunk.clone()
        elif rest.startswith("attn.proj."):
            out[base + "attention.output.dense." + rest.rsplit(".", 1)[1]] = value
        elif rest.startswith(("ls1.", "ls2.")):
            out[f"{base}layer_scale{rest[2]}.lambda1"] = value
        else:
            out[base + rest] = value
    return out


def write_checkpoint(state: dict[str, torch.Tensor], folder: Path, name: str, wrap: str) -> Path:
    from safetensors.torch import save_file

    path = folder / name
    if wrap == "transformers":
        state = timm_to_dinov2(state)
    if wrap == "module":
        state = {f"module.{k}": v for k, v in state.items()}
    state = {k: v.contiguous() for k, v in state.items()}
    if name.endswith(".safetensors"):
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "epoch": 1} if wrap == "state_dict" else state, path)
    return path


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_builds_and_loads_a_checkpoint_written_from_it(name: str, tmp_path: Path, no_network) -> None:
    """Published arguments at reduced depth: the feature size, normalisation and pooling of the
    preset, and its weights loaded from the published checkpoint form (features equal the source's)."""
    preset = PRESETS[name]
    small = {"depth": 1}
    random_enc, config = create_encoder(name, None, random_weights=True, model_kwargs=small, input_size=224)
    assert random_enc.feature_dim == preset.feature_dim and random_enc.weights_id == "random"
    assert tuple(config["mean"]) == preset.mean and tuple(config["std"]) == preset.std
    torch.manual_seed(11)
    source = perturbed(timm.create_model(preset.architecture, pretrained=False, num_classes=0,
                                         **layer_kwargs({**preset.model_kwargs, **small})))
    file, wrap = LAYOUTS[name]
    path = write_checkpoint(source.state_dict(), tmp_path, file, wrap)
    loaded, _ = create_encoder(name, None, tmp_path if wrap == "transformers" else path, model_kwargs=small)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out = source(x)
        if name == "virchow2":  # the published recipe: class token + mean of the patch tokens (1-4: registers)
            expected = torch.cat([out[:, 0], out[:, 5:].mean(1)], dim=-1)
        else:
            expected = out
        got = loaded(x)
    assert got.shape == (2, preset.feature_dim)
    torch.testing.assert_close(got, expected)
    assert loaded.weights_id == file_sha256(path)


@pytest.mark.parametrize("name, millions", [("uni", 303), ("uni2-h", 681), ("virchow2", 631),
                                            ("h-optimus-0", 1135), ("phikon-v2", 303)])
def test_preset_arguments_give_the_published_model_size(name: str, millions: int) -> None:
    """Full depth, on the meta device (no memory): the parameter count of the published model."""
    preset = PRESETS[name]
    with torch.device("meta"):
        model = timm.create_model(preset.architecture, pretrained=False, num_classes=0,
                                  **layer_kwargs(preset.model_kwargs))
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == millions


def test_transformers_dinov2_checkpoint_matches_transformers_output() -> None:
    """tests/data/dinov2-tiny was written by transformers' Dinov2Model (the Phikon-v2 layout) with
    its class-token output: bd maps the keys onto timm's ViT and gets the same numbers."""
    folder = DATA / "dinov2-tiny"
    expected = __import__("numpy").load(folder / "expected.npz")
    enc, _ = create_encoder("vit_base_patch16_224", None, folder / "model.safetensors", model_kwargs={
        "embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 64, "init_values": 1.0})
    with torch.no_grad():
        got = enc(torch.from_numpy(expected["x"]))
    torch.testing.assert_close(got, torch.from_numpy(expected["cls"]), atol=1e-5, rtol=1e-5)
    # a model with another patch grid: the position embedding is resampled at load as transformers
    # interpolates it at run time (here 4 x 4 -> 2 x 2 for 32-px inputs)
    small, _ = create_encoder("vit_base_patch16_224", None, folder / "model.safetensors", model_kwargs={
        "embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 32, "init_values": 1.0})
    with torch.no_grad():
        got = small(torch.from_numpy(expected["x32"]))
    torch.testing.assert_close(got, torch.from_numpy(expected["cls32"]), atol=1e-4, rtol=1e-4)


def test_layerscale_checkpoint_needs_init_values_and_says_so(tmp_path: Path) -> None:
    """The issue's case: a UNI-style ViT checkpoint is refused without init_values, naming the key."""
    torch.manual_seed(3)
    path = tmp_path / "vit.pth"
    torch.save(timm.create_model("vit_small_patch16_224", init_values=1e-5, depth=1).state_dict(), path)
    with pytest.raises(ConfigError, match=r"unexpected.*ls1\.gamma.*init_values"):
        create_encoder("vit_small_patch16_224", None, path, model_kwargs={"depth": 1})
    enc, _ = create_encoder("vit_small_patch16_224", None, path, model_kwargs={"depth": 1, "init_values": 1e-5})
    assert enc.feature_dim == 384
    # YAML 1.1 (PyYAML, Snakemake's config) reads 1e-5 as text: taken as the number
    create_encoder("vit_small_patch16_224", None, path, model_kwargs={"depth": 1, "init_values": "1e-5"})


def test_mean_std_overrides_and_their_checks() -> None:
    _, config = create_encoder("resnet18", "layer1", random_weights=True, mean=[0.7, 0.6, 0.7], std=[0.2, 0.2, 0.2])
    assert config["mean"] == (0.7, 0.6, 0.7) and config["std"] == (0.2, 0.2, 0.2)
    with pytest.raises(ConfigError, match=r"features\.std.*3 numbers"):
        create_encoder("resnet18", "layer1", random_weights=True, std=[0.2, 0.2])
    with pytest.raises(ConfigError, match=r"features\.std"):
        create_encoder("resnet18", "layer1", random_weights=True, std=[0.2, 0.0, 0.2])


def test_bad_foundation_settings_are_named() -> None:
    with pytest.raises(ConfigError, match=r"features\.out_stage.*uni.*null"):
        create_encoder("uni", "layer3", random_weights=True, model_kwargs={"depth": 1})
    with pytest.raises(ConfigError, match=r"features\.input_size.*224.*dynamic_img_size"):
        create_encoder("h-optimus-0", None, random_weights=True, model_kwargs={"depth": 1}, input_size=112)
    with pytest.raises(ConfigError, match=r"features\.model_kwargs\.mlp_layer.*Nope"):
        create_encoder("vit_small_patch16_224", None, random_weights=True, model_kwargs={"mlp_layer": "Nope"})
    with pytest.raises(ConfigError, match=r"features\.model_kwargs.*bogus"):
        create_encoder("resnet18", None, random_weights=True, model_kwargs={"bogus": 1})
    with pytest.raises(ConfigError, match=r"features\.pool.*cls\+mean.*resnet18"):
        create_encoder("resnet18", None, random_weights=True, pool="cls+mean")
    with pytest.raises(ConfigError, match=r"features\.model_kwargs.*2560"):
        create_encoder("virchow2", None, random_weights=True, model_kwargs={"depth": 1, "embed_dim": 160, "num_heads": 2})
    with pytest.raises(ConfigError, match=r"features\.model_kwargs.*AssertionError"):
        create_encoder("virchow2", None, random_weights=True, model_kwargs={"depth": 1, "embed_dim": 64, "num_heads": 2})


def test_dynamic_img_size_takes_another_input_size() -> None:
    enc, _ = create_encoder("uni", None, random_weights=True, model_kwargs={"depth": 1}, input_size=112)
    with torch.no_grad():
        assert enc(torch.randn(1, 3, 112, 112)).shape == (1, 1024)


def hub_folder_of(folder: Path, arch: str, args: dict, mean: list[float], seed: int = 2) -> torch.nn.Module:
    """A timm hub model folder (config.json + model.safetensors), as `hf download` leaves it."""
    import json

    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "architecture": arch, "model_args": {**args, "num_classes": 0},
        "pretrained_cfg": {"mean": mean, "std": [0.25, 0.25, 0.25], "num_classes": 0}}))
    torch.manual_seed(seed)
    model = perturbed(timm.create_model(arch, pretrained=False, num_classes=0, **args))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return model


def test_hf_hub_name_from_a_local_folder(tmp_path: Path, no_network) -> None:
    args = {"depth": 1, "init_values": 1e-5}
    source = hub_folder_of(tmp_path / "lab-vit", "vit_small_patch16_224", args, [0.6, 0.5, 0.6])
    enc, config = create_encoder("hf-hub:lab/vit", None, tmp_path / "lab-vit")
    by_name, _ = create_encoder("vit_small_patch16_224", None, tmp_path / "lab-vit", model_kwargs=args)
    assert by_name.weights_id == enc.weights_id  # a timm name takes the folder's checkpoint too
    assert config["mean"] == (0.6, 0.5, 0.6) and config["std"] == (0.25, 0.25, 0.25)
    assert enc.weights_id == file_sha256(tmp_path / "lab-vit" / "model.safetensors")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), source(x))


def hub_cache(monkeypatch: pytest.MonkeyPatch, root: Path) -> Path:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    return root


def test_hf_hub_name_from_the_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network) -> None:
    """A preset without features.weights is found in Hugging Face's cache, offline."""
    cache = hub_cache(monkeypatch, tmp_path / "hub")
    repo = cache / "models--MahmoodLab--UNI"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    snapshot = repo / "snapshots" / "0123abcd"
    preset = PRESETS["uni"]
    source = hub_folder_of(snapshot, preset.architecture, {**preset.model_kwargs, "depth": 1}, list(preset.mean))
    for name in ("uni", "hf-hub:MahmoodLab/UNI"):
        enc, _ = create_encoder(name, None, model_kwargs={"depth": 1})
        assert enc.weights_id == file_sha256(snapshot / "model.safetensors")
        x = torch.randn(1, 3, 224, 224)
        with torch.no_grad():
            torch.testing.assert_close(enc(x), source(x))


def test_absent_hub_model_is_a_clear_error_naming_the_folder(tmp_path: Path, monkeypatch, no_network) -> None:
    hub_cache(monkeypatch, tmp_path / "hub")
    with pytest.raises(ConfigError, match=r"paige-ai/Virchow2 is not in the local.*models--paige-ai--Virchow2.*features\.weights"):
        create_encoder("virchow2", None)
    with pytest.raises(ConfigError, match=r"lab/none.*not in the local"):
        create_encoder("hf-hub:lab/none", None)
    with pytest.raises(ConfigError, match=r"folder .*nowhere does not exist"):
        create_encoder("hf-hub:lab/none", None, tmp_path / "nowhere" / "model.safetensors")


def test_transformers_folder_under_a_hub_name_is_refused_clearly(tmp_path: Path) -> None:
    folder = tmp_path / "phikon"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "dinov2", "architectures": ["Dinov2Model"]}')
    with pytest.raises(ConfigError, match=r"not a timm model config.*transformers dinov2.*phikon-v2"):
        create_encoder("hf-hub:someone/phikon-copy", None, folder)
