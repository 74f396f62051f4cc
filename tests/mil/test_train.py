"""Training: every method can fit a tiny cohort, a seed gives the same checkpoint, and `bd train`
writes a checkpoint that `bd.mil.runs.load_run` reads back and checks its inputs against."""

from __future__ import annotations

import hashlib
import os
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bd.mil.bags import load_cohort
from bd.synthetic import synthetic_cohort
from bd.cli import main
from bd.errors import ConfigError, StoreError, TableError
from bd.evaluation.metrics import auc
from bd.mil.models import CONDITION_NAMES, MODELS
from bd.params import build
from bd.mil.runs import load_run, predict_patients
from bd.mil.train import EARLY_STOPPING, TrainParams, train_model
from bd.mil.validation import choose_threshold
from synthetic_results import write_cohort_layout

DIM, CLIN = 16, 4
TINY = {"hidden_dim": 16, "clinical_dim": 8, "prompt_length": 6, "smil_priors": 3, "precision": "fp32"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.mark.parametrize("method", sorted(MODELS))
def test_every_method_overfits_a_tiny_cohort(method):
    """A few dozen SGD steps per stage reach a training AUC of ~1 under each condition it serves."""
    cohort = synthetic_cohort(16, 8, DIM, CLIN, seed=5, signal=4.0)
    train = cohort.indices("train")
    torch.manual_seed(0)
    params = TrainParams(method=method, **TINY)
    from bd.mil.models import create_model

    model = create_model(method, DIM, CLIN, **vars(params))
    model.setup(torch.from_numpy(cohort.clinical[train]))
    batch = cohort.batch(train)
    for stage in model.stages():
        optimizer = torch.optim.SGD(model.stage_parameters(stage), lr=0.05, momentum=0.9)
        for _ in range(40):
            optimizer.zero_grad()
            model.losses(batch, stage.name)["loss"].backward()
            optimizer.step()
    for clin, slide in model.conditions:
        n = len(train)
        probs, _ = predict_patients(model, cohort, train, np.full(n, clin), np.full(n, slide))
        assert auc(cohort.labels[train], probs) >= 0.99, (method, CONDITION_NAMES[(clin, slide)])


def test_same_seed_same_checkpoint_other_seed_differs():
    cohort = synthetic_cohort(12, 6, DIM, CLIN, seed=1)
    params = TrainParams(method="bd", max_epochs=3, patience=3, lr=0.05, batch_size=2, **{**TINY, "precision": "bf16"})
    runs = [train_model(cohort, params, seed, progress=False) for seed in (7, 7, 8)]
    first, again, other = (r.model.state_dict() for r in runs)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    pd.testing.assert_frame_equal(runs[0].curve, runs[1].curve)


@pytest.mark.parametrize("rule", ["val_auc", "val_loss", "val_f1", "train_f1"])
def test_early_stopping_keeps_the_best_epoch_of_its_rule(rule):
    cohort = synthetic_cohort(16, 6, DIM, CLIN, seed=2, signal=3.0)
    params = TrainParams(method="image_only", max_epochs=30, patience=2, min_epochs=3, lr=0.05, batch_size=4,
                         early_stopping=rule, **TINY)
    result = train_model(cohort, params, 0, progress=False)
    curve = result.curve
    best = result.stage_epochs["main"]
    assert best >= params.min_epochs
    assert len(curve) <= max(best, params.min_epochs) + params.patience
    column, sign = EARLY_STOPPING[rule]
    eligible = curve[curve["epoch"] >= params.min_epochs]
    chosen = curve.loc[curve["epoch"] == best, column].item()
    assert sign * chosen == (sign * eligible[column]).max()
    val = curve.loc[curve["epoch"] == best, "val_auc"].item()
    assert result.val["val_auc"] == pytest.approx(val)  # the chosen weights were restored


def test_min_epochs_are_never_kept():
    """An epoch before min_epochs is not kept even if it scores best, and training runs that long."""
    cohort = synthetic_cohort(16, 6, DIM, CLIN, seed=2, signal=3.0)
    params = TrainParams(method="image_only", max_epochs=8, patience=1, min_epochs=6, lr=1e-6, batch_size=4,
                         early_stopping="val_loss", **TINY)
    result = train_model(cohort, params, 0, progress=False)
    assert result.stage_epochs["main"] >= 6
    assert len(result.curve) >= 6


def test_curve_logs_each_terms_share_of_its_branch_loss():
    cohort = synthetic_cohort(16, 6, DIM, CLIN, seed=2, signal=3.0)
    params = TrainParams(method="bd", max_epochs=2, min_epochs=1, lr=0.05, batch_size=4, **TINY)
    curve = train_model(cohort, params, 0, progress=False).curve
    for col in ("share_mul_ce", "share_mul_distill", "share_sgl_ce", "share_sgl_mse", "share_sgl_kl"):
        assert col in curve and curve[col].between(0, 1).all(), col
    assert (curve["share_mul_distill"] >= 0.05).all()  # S->M is not switched off by its own scale
    np.testing.assert_allclose(curve["share_mul_ce"] + curve["share_mul_distill"], 1.0, rtol=1e-6)


@pytest.mark.parametrize(("method", "branches"), [
    ("filling", {"fusion", "filled", "slide_filled"}), ("bd", {"multi", "single"}),
    ("ensemble", {"ensemble", "image"}), ("clinical_only", {"clinical", "filled"}),
    ("modality_dropout", {"fusion", "token"})])
def test_one_threshold_per_branch(method, branches):
    """Every answering branch, Filling's zero-filled ones included, is tuned on validation under
    the condition where it answers."""
    cohort = synthetic_cohort(16, 6, DIM, CLIN, seed=2, signal=3.0)
    params = TrainParams(method=method, max_epochs=2, min_epochs=1, lr=0.05, batch_size=4, **TINY)
    result = train_model(cohort, params, 0, progress=False)
    assert set(result.thresholds) == branches
    val = cohort.indices("val")
    n = len(val)
    conditions = {"filled": (False, True), "slide_filled": (True, False), "single": (False, True),
                  "image": (False, True), "token": (False, True)}
    for branch, (clin, slide) in conditions.items():
        if branch in branches:
            probs, answered = predict_patients(result.model, cohort, val, np.full(n, clin), np.full(n, slide))
            assert set(answered) == {branch}
            assert result.thresholds[branch] == choose_threshold(cohort.labels[val], probs)


def test_standardisation_is_fitted_on_training_patches_only():
    cohort = synthetic_cohort(16, 6, DIM, CLIN, seed=2, signal=3.0)
    cohort.features[cohort.offsets[cohort.indices("test")[0]]] += 1000.0  # a test outlier must not matter
    params = TrainParams(method="image_only", max_epochs=1, min_epochs=1, lr=0.05, batch_size=4, **TINY)
    result = train_model(cohort, params, 0, progress=False)
    train = cohort.indices("train")
    rows = torch.cat([cohort.features[int(cohort.offsets[i]) : int(cohort.offsets[i + 1])] for i in train]).double()
    torch.testing.assert_close(result.model.pool_img.feature_mean, rows.mean(0).float())
    torch.testing.assert_close(result.model.pool_img.feature_std, rows.std(0, unbiased=False).float())


def test_choose_threshold_maximises_macro_f1():
    labels = np.array([0, 0, 0, 1, 1])
    probs = np.array([0.1, 0.2, 0.35, 0.3, 0.9])
    assert choose_threshold(labels, probs) == pytest.approx(0.3)  # macro F1 0.8 (0.9 gives 0.76)
    assert choose_threshold(np.array([0, 1]), np.array([0.2, 0.4])) == pytest.approx(0.4)
    assert choose_threshold(np.array([1, 1]), np.array([0.2, 0.4])) == 0.5


@pytest.mark.parametrize(("params", "message"), [
    ({"max_epoch": 3}, "unknown key 'training.max_epoch'"),
    ({"directions": "up"}, "training.directions"),
    ({"method": "lnmp"}, "unknown method 'lnmp'"),
    ({"lr": 0}, "training.lr"),
    ({"precision": "fp8"}, "training.precision"),
    ({"early_stopping": "test_auc"}, "training.early_stopping"),
    ({"min_epochs": 50, "max_epochs": 10}, "training.min_epochs"),
])
def test_bad_params_name_the_key(params, message):
    with pytest.raises(ConfigError, match=message):
        build(TrainParams, params)


# ---------------------------------------------------------------- the command and run loading


def write_layout(root: Path, n: int = 16) -> dict[str, Path]:
    """Feature stores, sample sheet, clinical table and scaler for ``n`` patients (one without a store)."""
    return write_cohort_layout(root, n, patches=8, dim=DIM, clin=CLIN, seed=4, signal=3.0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    paths = write_layout(root)
    out = root / "run"
    params = {**TINY, "method": "bd", "max_epochs": 4, "patience": 4, "lr": 0.05, "batch_size": 4,
              "methods": ["bd"], "seeds": [0]}
    rc = main(["train", "--feature-index", str(paths["features"]), "--samples", str(paths["samples"]),
               "--clinical", str(paths["clinical"]), "--seed", "3", "--params", json.dumps(params),
               "--out-dir", str(out), "--no-progress", "--threads", "1"])
    assert rc == 0
    return paths, out


def test_train_command_writes_checkpoint_curve_and_plot(trained):
    paths, out = trained
    curve = pd.read_csv(out / "curve.csv")
    assert {"stage", "epoch", "train_loss", "train_mul_ce", "train_sgl_kl", "val_f1", "val_auc",
            "val_f1_complete", "val_f1_no_clinical"} <= set(curve.columns)
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["method"] == "bd" and ckpt["seed"] == 3 and ckpt["params"]["lambda_m"] == 0.6
    assert ckpt["identity"]["encoder"] == "toy" and "slide_id" not in ckpt["identity"]
    assert ckpt["clinical_columns"] == [f"c{j}" for j in range(CLIN)]
    assert ckpt["scaler"]["sha256"] == hashlib.sha256(paths["scaler"].read_bytes()).hexdigest()
    assert 1 <= ckpt["epoch"] <= 4 and ckpt["stage_epochs"] == {"joint": ckpt["epoch"]}
    assert 0 < ckpt["threshold"] < 1 and set(ckpt["thresholds"]) == {"multi", "single"}
    assert not list(out.glob(".*tmp*"))  # atomic writes left no temporary files


def test_load_run_predicts_under_any_presence(trained):
    paths, out = trained
    run = load_run(out / "checkpoint.pt", device="cpu")
    cohort = load_cohort(paths["features"], paths["samples"], paths["clinical"], progress=False)
    n = cohort.n_patients
    clin = np.arange(n) % 3 != 0
    df = run.predict(cohort, clinical_present=clin)
    assert list(df.columns[:4]) == ["patient_id", "prob", "branch", "label"]
    assert df["patient_id"].tolist() == cohort.patient_ids
    assert df["branch"].tolist() == ["multi" if c else "single" for c in clin]
    assert df["prob"].between(0, 1).all() and run.params["method"] == "bd"
    assert (df["threshold"] == df["branch"].map(run.thresholds)).all()
    assert run.threshold == pytest.approx(torch.load(out / "checkpoint.pt", weights_only=True)["threshold"])
    emb = run.slide_embeddings(cohort, "single")
    assert emb.shape == (n, TINY["hidden_dim"])
    assert np.isnan(emb[~cohort.has_slide]).all() and np.isfinite(emb[cohort.has_slide]).all()
    att = run.attention(cohort, cohort.patient_ids[0])
    assert list(att.columns) == ["slide_id", "x", "y", "attention"] and att["attention"].sum() == pytest.approx(1)


def test_load_run_refuses_other_features_or_clinical_columns(trained):
    paths, out = trained
    run = load_run(out / "checkpoint.pt", device="cpu")
    cohort = load_cohort(paths["features"], paths["samples"], paths["clinical"], progress=False)
    cohort.identity = {**cohort.identity, "encoder": "resnet50"}
    with pytest.raises(StoreError, match="encoder='toy'.*encoder='resnet50'"):
        run.predict(cohort, np.ones(cohort.n_patients, bool))
    cohort = load_cohort(paths["features"], paths["samples"], paths["clinical"], progress=False)
    cohort.clinical_columns = ["c0", "c1", "c2", "grade"]
    with pytest.raises(TableError, match="c3, grade"):
        run.predict(cohort, np.ones(cohort.n_patients, bool))


# ---------------------------------------------------------------- precision, step packing


CPUINFO = """processor\t: 0
vendor_id\t: {vendor}
model name\t: {model}
flags\t\t: fpu sse sse2 avx avx2 fma {extra}

processor\t: 1
model name\t: {model}
flags\t\t: fpu
"""


@pytest.mark.parametrize(("extra", "native"), [("", False), ("avx512f avx512bw", False),
                                               ("avx512f avx512_bf16", True), ("amx_bf16 amx_tile", True)])
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, monkeypatch, extra, native):
    from bd import device

    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO.format(vendor="X", model="Test CPU 9000", extra=extra))
    model, flags = device.parse_cpuinfo(path.read_text())
    assert model == "Test CPU 9000" and "avx2" in flags and "fpu" in flags
    info = device.cpu_info.__wrapped__(str(path))
    assert info.native_bf16 is native
    monkeypatch.setattr(device, "cpu_info", lambda: info)
    precision, why = device.resolve_precision("auto", torch.device("cpu"), "training.precision")
    assert precision == ("bf16" if native else "fp32")
    assert "Test CPU 9000" in why and "training.precision: auto" in why
    assert device.resolve_precision("bf16", torch.device("cpu"))[0] == "bf16"  # an explicit choice stands
    assert ("no native bf16" in device.cpu_summary()) is not native and "Test CPU 9000" in device.cpu_summary()


def test_unreadable_cpuinfo_falls_back_to_torch_capability(tmp_path):
    from bd import device

    info = device.cpu_info.__wrapped__(str(tmp_path / "missing"))
    assert info.flags == frozenset()
    assert info.native_bf16 is ("AMX" in info.capability.upper())


def test_auto_precision_and_batch_size_are_recorded_in_the_checkpoint(trained, tmp_path):
    from bd import device
    from bd.mil.train import checkpoint_payload

    cohort = synthetic_cohort(16, 6, DIM, CLIN, seed=2, signal=3.0)
    params = TrainParams(method="image_only", max_epochs=1, lr=0.05, **{**TINY, "precision": "auto"})
    assert params.batch_size == "auto"
    result = train_model(cohort, params, 0, progress=False)
    expected = "bf16" if device.cpu_info().native_bf16 else "fp32"
    assert result.resolved["precision"] == expected
    assert result.resolved["batch_size"] == 1  # a small cohort keeps one bag per step
    assert "training.precision: auto" in result.resolved["precision_reason"]
    assert (result.model.pool_img.compute_dtype is None) is (expected == "fp32")
    payload = checkpoint_payload(result, cohort, params, 0, None)
    assert payload["params"]["precision"] == "auto" and payload["model_kwargs"]["precision"] == expected
    assert payload["resolved"]["batch_size"] == 1 and payload["resolved"]["hardware"]


def test_auto_batch_size_packs_bags_only_for_bcnb_sized_cohorts():
    from types import SimpleNamespace

    from bd.mil.train import auto_batch_size

    def fake(patients, patches, dim):
        return SimpleNamespace(lengths=lambda: np.full(patients, patches), feature_dim=dim)

    assert auto_batch_size(fake(630, 2000, 1024), np.arange(630))[0] == 8  # BCNB: ~16 k patches a step
    assert auto_batch_size(fake(630, 2000, 64), np.arange(630))[0] == 1  # narrow features
    assert auto_batch_size(fake(36, 2000, 1024), np.arange(36))[0] == 1  # the demo's size
    assert auto_batch_size(fake(630, 500, 2048), np.arange(630))[0] == 16  # capped
    with pytest.raises(ConfigError, match="training.batch_size"):
        TrainParams(batch_size=0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_patch_layer_equals_separate_layers(precision):
    """BD embeds each patch for both branches in one matmul: same values and gradients as two
    layers, and a loss of one branch gives the other branch no gradient at all."""
    from bd.mil.models import create_model, embed_instances

    torch.manual_seed(0)
    model = create_model("bd", DIM, CLIN, **{**TINY, "precision": precision})
    model.standardise(torch.linspace(-1, 1, DIM), torch.linspace(0.5, 2, DIM))  # the fused path standardises too
    x = torch.randn(50, DIM).to(torch.bfloat16 if precision == "bf16" else torch.float32)
    pools = (model.pool_mul, model.pool_sgl)
    fused = embed_instances(pools, x)
    separate = [_plain_instances(pool, x) for pool in pools]
    for pool, plain in zip(pools, separate):  # one pool alone runs the same fused layer
        torch.testing.assert_close(pool.instances(x), plain, rtol=1e-2 if precision == "bf16" else 1e-5,
                                   atol=1e-2 if precision == "bf16" else 1e-5)
    for a, b in zip(fused, separate):
        torch.testing.assert_close(a, b, rtol=1e-2 if precision == "bf16" else 1e-5, atol=1e-2 if precision == "bf16" else 1e-5)
    (fused[1] ** 2).sum().backward()
    assert model.pool_mul.embed.weight.grad is None and model.pool_mul.embed.bias.grad is None
    fused_grad = model.pool_sgl.embed.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    (separate[1] ** 2).sum().backward()
    tol = 5e-2 if precision == "bf16" else 1e-4
    torch.testing.assert_close(fused_grad, model.pool_sgl.embed.weight.grad, rtol=tol, atol=tol)


def _plain_instances(pool, x: torch.Tensor) -> torch.Tensor:
    """A pool's instance embeddings by plain autograd ops (the reference for the fused layer)."""
    dtype = pool.compute_dtype or torch.float32
    w, b = pool.embed.weight.to(dtype), pool.embed.bias.to(dtype)
    return torch.relu(torch.nn.functional.linear(pool.standardised(x.to(dtype)), w, b)).float()


def test_packed_step_converts_while_packing():
    cohort = synthetic_cohort(6, 10, DIM, CLIN, seed=1, dtype=torch.bfloat16)
    idx = np.array([4, 0, 2])
    batch = cohort.batch(idx, dtype=torch.float32)
    expected = torch.cat([cohort.features[cohort.offsets[i] : cohort.offsets[i + 1]] for i in idx]).float()
    assert batch.features.dtype == torch.float32
    torch.testing.assert_close(batch.features, expected, rtol=0, atol=0)
    assert batch.offsets.tolist() == [0, *np.cumsum(cohort.lengths()[idx]).tolist()]


def _bd_runs(directions: list[str], seed: int = 0, epochs: int = 12):
    """BD trained with each directions setting from the same seed, the last epoch kept."""
    cohort = synthetic_cohort(40, 10, DIM, CLIN, seed=7, signal=1.5)
    out = {}
    for d in directions:
        params = TrainParams(method="bd", max_epochs=epochs, min_epochs=epochs, lr=0.05, batch_size=2,
                             directions=d, **TINY)
        out[d] = train_model(cohort, params, seed, progress=False).model
    return cohort, out


def _branch_outputs(model, cohort):
    idx = np.arange(cohort.n_patients)
    with torch.no_grad():
        batch = cohort.batch(idx)
        f_wm = model.pool_mul(batch.features, batch.offsets)[0].numpy()
        f_ws = model.pool_sgl(batch.features, batch.offsets)[0].numpy()
    p_mul, _ = predict_patients(model, cohort, idx, np.ones(len(idx), bool))
    p_sgl, _ = predict_patients(model, cohort, idx, np.zeros(len(idx), bool))
    return f_wm, f_ws, p_mul, p_sgl


def test_s2m_moves_f_wm_toward_f_ws_and_m2s_moves_the_single_branch():
    """Same seed, same data order: S->M raises linear CKA(f_wm, f_ws) over `none` (mean of two
    seeds) and leaves the single-modal branch as it was; M->S changes the single-modal outputs
    and leaves the multi-modal branch as it was."""
    from bd.paper.s2m import linear_cka

    cka = {"none": [], "s2m": []}
    for seed in (0, 1):
        cohort, models = _bd_runs(["none", "s2m", "m2s"], seed)
        none, s2m, m2s = (_branch_outputs(models[d], cohort) for d in ("none", "s2m", "m2s"))
        cka["none"].append(linear_cka(none[0], none[1]))
        cka["s2m"].append(linear_cka(s2m[0], s2m[1]))
        np.testing.assert_allclose(s2m[3], none[3], atol=1e-6)  # single-modal branch untouched by S->M
        np.testing.assert_allclose(m2s[2], none[2], atol=1e-6)  # multi-modal branch untouched by M->S
        assert np.abs(m2s[3] - none[3]).max() > 1e-3
    assert np.mean(cka["s2m"]) > np.mean(cka["none"]) + 0.02, cka


def test_modality_dropout_learns_both_paths_and_its_dropping_is_seeded():
    """Trained by train_model: held-out probabilities spread (not the prior) with clinical data
    present and absent, the token moved from its initialisation, and the same seed gives the
    same run (the drops come from the seeded generator) while another seed does not."""
    cohort = synthetic_cohort(60, 8, DIM, CLIN, seed=3, signal=2.0)
    params = TrainParams(method="modality_dropout", max_epochs=12, min_epochs=1, patience=12, lr=0.05,
                         batch_size=4, **TINY)
    runs = [train_model(cohort, params, seed, progress=False) for seed in (0, 0, 1)]
    first, again, other = (r.model.state_dict() for r in runs)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["missing.token"], other["missing.token"])
    from bd.mil.models import create_model

    torch.manual_seed(0)
    init = create_model("modality_dropout", DIM, CLIN, **vars(params)).missing_token
    assert not torch.allclose(first["missing.token"], init)
    test = cohort.indices("test")
    n = len(test)
    for clin in (True, False):
        probs, branches = predict_patients(runs[0].model, cohort, test, np.full(n, clin), np.ones(n, bool))
        assert set(branches) == {"fusion" if clin else "token"}
        assert probs.std() > 0.1, (clin, probs.std())  # 0.35 at epoch 12 (0.01 untrained)
        assert auc(cohort.labels[test], probs) > 0.6, clin


STEP_FAULTS = """
import json, resource, sys
import torch
from bd.device import retain_freed_memory

if sys.argv[1] == "retain" and not retain_freed_memory():
    print(json.dumps(None)); raise SystemExit
def step(rows):
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.empty(rows, width).fill_(1.0) for width in (1024, 256, 128, 128, 64, 64)]
    del tensors
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
for _ in range(3):  # the largest step: the heap grows to hold it
    step(19000)
print(json.dumps([step(rows) for rows in (16500, 18800, 14200, 17300, 15600, 18100)]))
"""


def test_training_steps_reuse_freed_memory_instead_of_faulting_it_in_again():
    """After retain_freed_memory (run_epoch calls it), a step's intermediates (several 4-75 MB
    tensors, sized by the step's patch count) come back from the heap the next step: no page
    faults for memory the process already had (glibc's default unmaps or trims them each step).
    Measured in a fresh process each way, since the faults depend on the heap's history."""
    import json
    import platform
    import subprocess
    import sys

    def faults(mode: str) -> list[int] | None:
        out = subprocess.run([sys.executable, "-c", STEP_FAULTS, mode], capture_output=True, text=True,
                             check=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
        return json.loads(out.stdout.strip().splitlines()[-1])

    retained = faults("retain")
    if retained is None:
        assert platform.libc_ver()[0] != "glibc"
        pytest.skip("not glibc: malloc keeps its own policy")
    assert sum(retained) < 1000, retained
    assert sum(faults("default")) > 10 * max(sum(retained), 100)  # glibc's default: fresh mappings each step
