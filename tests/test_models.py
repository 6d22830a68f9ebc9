"""Demo ecosystems, manifest validation and the ONNX Runtime wrapper."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml

from models import InputError, ManifestError, ProviderError, load_manifest, load_member, validate_input
from models.build import build_models
from models.heldout import load_heldout
from models.runtime import resolve_providers

ROOT = Path(__file__).resolve().parent.parent


def test_demo_ecosystems_have_the_promised_members(model_repo):
    digits = load_manifest(model_repo / "digits")
    families = {m.family for m in digits.members if not m.compressed}
    assert len([m for m in digits.members if not m.compressed]) >= 5 and len(families) >= 4
    comp = [m for m in digits.members if m.compressed]
    assert len(comp) == 1 and comp[0].compressed_from == "mlp_a"
    credit = load_manifest(model_repo / "credit")
    assert len(credit.members) >= 4 and len({m.family for m in credit.members}) >= 4
    assert credit.subgroups == {"sex": ("female", "male"), "age_group": ("young", "adult")}
    assert credit.intersections == (("sex", "age_group"),)
    held = load_heldout(model_repo / "credit")
    assert held.X.shape[0] == held.y.shape[0] == held.groups["sex"].shape[0] == 300
    assert set(held.groups["sex"]) == {"female", "male"}


def test_quantized_member_is_really_int8(model_repo):
    import onnx

    q = onnx.load(str(model_repo / "digits" / "mlp_a_int8" / "1" / "model.onnx"))
    ops = {n.op_type for n in q.graph.node}
    assert ops & {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}, ops


def test_build_is_deterministic_and_a_rebuild_is_a_no_op(model_repo, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = build_models(tmp_path, ["credit"])
        files = sorted(p for p in (tmp_path / "credit").rglob("*") if p.is_file())
        before = {p: p.stat().st_mtime_ns for p in files}
        again = build_models(tmp_path, ["credit"])
    assert first[0].built and not again[0].built
    assert {p: p.stat().st_mtime_ns for p in files} == before
    # same seeds, same models: the same split and the same outputs as the session repository's build
    # (skl2onnx's generated node names may differ between processes, so compare behaviour, not bytes)
    import onnxruntime as ort

    assert (tmp_path / "credit" / "heldout.npz").read_bytes() == (model_repo / "credit" / "heldout.npz").read_bytes()
    X = load_heldout(tmp_path / "credit").X
    for p in files:
        if p.suffix == ".onnx":
            a = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": X})
            other = model_repo / "credit" / p.relative_to(tmp_path / "credit")
            b = ort.InferenceSession(str(other), providers=["CPUExecutionProvider"]).run(None, {"input": X})
            assert np.array_equal(a[0], b[0]) and np.allclose(a[1], b[1]), p


def test_build_rejects_unknown_ecosystem(tmp_path):
    with pytest.raises(ValueError, match="unknown demo ecosystem 'nope'"):
        build_models(tmp_path, ["nope"])


def _write(tmp_path, data, name="eco"):
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    (d / "ecosystem.yaml").write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return d


def _good(name="eco"):
    return {
        "name": name,
        "task": "classification",
        "input": {"name": "input", "shape": [-1, 4], "dtype": "float32"},
        "classes": ["a", "b"],
        "members": [{"name": "m1", "version": "1", "path": "m1/1/model.onnx"}],
    }


@pytest.mark.parametrize(
    "mutate, field, bad",
    [
        (lambda d: d["input"].update(dtype="float16"), "input.dtype", "'float16'"),
        (lambda d: d["input"].update(shape=[4, 4]), "input.shape", "[4, 4]"),
        (lambda d: d["members"][0].update(path="/abs/model.onnx"), "members.0.path", "'/abs/model.onnx'"),
        (lambda d: d["members"][0].update(name="Bad Name"), "members.0.name", "'Bad Name'"),
        (lambda d: d.update(task="clustering"), "task", "'clustering'"),
        (lambda d: d.update(colour="red"), "colour", "'red'"),
        (lambda d: d.update(subgroups={"sex": ["f", "f"]}), "subgroups", "{...}"),
        (lambda d: d.update(intersections=[["sex", "age"]]), "(top level)", ""),
        (lambda d: d.update(classes=["a"]), "(top level)", "at least 2 classes"),
        (lambda d: d.update(regression={"tolerance": 1, "range": [0, 1]}), "(top level)", "for task regression only"),
        (lambda d: d.update(task="regression"), "(top level)", "needs 'regression' settings"),
        (lambda d: d.update(task="regression", probability_output=None, regression={"tolerance": 1, "range": [0, 1]}),
         "(top level)", "has no classes"),
        (lambda d: (d.pop("classes"), d.update(task="regression", regression={"tolerance": 1, "range": [0, 1]})),
         "(top level)", "no probability_output"),
        (lambda d: (d.pop("classes"), d.update(task="regression", probability_output=None,
                                                regression={"tolerance": 0, "range": [0, 1]})),
         "regression.tolerance", "greater than 0"),
        (lambda d: (d.pop("classes"), d.update(task="regression", probability_output=None,
                                                regression={"tolerance": 1, "range": [5, 1]})),
         "regression", "low < high"),
        (lambda d: (d.pop("classes"), d.update(task="regression", probability_output=None,
                                                regression={"tolerance": 0.001, "range": [0, 1]})),
         "regression", "1000 bins; at most 256"),
    ],
)
def test_bad_manifest_names_file_field_and_value(tmp_path, mutate, field, bad):
    data = _good()
    mutate(data)
    d = _write(tmp_path, data)
    with pytest.raises(ManifestError) as err:
        load_manifest(d)
    msg = str(err.value)
    assert str(d / "ecosystem.yaml") in msg
    assert f"field '{field}'" in msg
    assert bad in msg


def test_regression_manifest_bins():
    from models.manifest import RegressionSpec

    spec = RegressionSpec(tolerance=40, range=(0, 400))
    assert spec.n_bins == 10 and spec.width == 40
    assert spec.bin_names()[:2] == ("[0,40)", "[40,80)")
    assert RegressionSpec(tolerance=40, range=(0, 100), bin_width=30).n_bins == 4  # the last bin is partial


def test_regression_ecosystem_members_give_values(model_repo):
    import onnxruntime as ort

    d = model_repo / "diabetes"
    manifest = load_manifest(d)
    assert manifest.task == "regression" and manifest.regression.tolerance == 40
    assert manifest.subgroups == {"sex": ("sex_1", "sex_2"), "age_group": ("under_50", "50_plus")}
    assert [m.name for m in manifest.members if m.compressed] == ["mlp_int8"]
    held = load_heldout(d, manifest)
    assert held.y.dtype.kind == "f" and held.X.shape == (133, 10)
    for spec in manifest.members:
        values, probs = load_member(d, manifest, spec, "cpu").predict(held.X[:40])
        assert probs is None and values.dtype == np.float64 and values.shape == (40,)
        raw = ort.InferenceSession(str(d / spec.path), providers=["CPUExecutionProvider"])
        assert np.array_equal(values, raw.run(["variable"], {"input": held.X[:40]})[0].reshape(-1))
        assert 0.3 < np.mean(np.abs(values - held.y[:40]) <= 40) < 0.9  # a real model, not a constant


def test_manifest_name_must_match_folder_and_be_yaml(tmp_path):
    d = _write(tmp_path, _good("other"), name="eco")
    with pytest.raises(ManifestError, match="must equal the folder name 'eco'"):
        load_manifest(d)
    d = _write(tmp_path, "name: [unclosed", name="broken")
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_manifest(d)
    with pytest.raises(ManifestError, match="no such manifest"):
        load_manifest(tmp_path / "missing")


def test_auto_provider_is_cpu_here_and_says_nothing_on_stderr(model_repo):
    # In a fresh process: auto must not call preload_dlls or ask for CUDA on a CPU machine.
    code = (
        "import sys; from models import load_manifest, load_member; "
        f"d={str(model_repo / 'digits')!r}; m=load_manifest(d); "
        "s=load_member(d, m, m.members[0], 'auto'); print(s.provider)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    from models.runtime import cuda_device_count

    if cuda_device_count() == 0:
        assert proc.stdout.strip() == "CPUExecutionProvider"
        assert proc.stderr == ""


def test_cuda_provider_without_a_device_is_a_clear_error(model_repo):
    from models.runtime import cuda_device_count

    if cuda_device_count() > 0:
        pytest.skip("a CUDA device is present: 'cuda' is expected to work here")
    with pytest.raises(ProviderError, match="no CUDA device is visible"):
        resolve_providers("cuda")


def test_member_session_matches_onnxruntime_directly(model_repo):
    import onnxruntime as ort

    d = model_repo / "digits"
    manifest = load_manifest(d)
    held = load_heldout(d, manifest)
    for spec in manifest.members:
        s = load_member(d, manifest, spec, "cpu")
        assert s.provider == "CPUExecutionProvider"
        labels, probs = s.predict(held.X[:50])
        raw = ort.InferenceSession(str(d / spec.path), providers=["CPUExecutionProvider"])
        want = raw.run(["label"], {"input": held.X[:50]})[0]
        assert np.array_equal(labels, want)
        assert probs.shape == (50, 10)


@pytest.mark.parametrize(
    "data, message",
    [
        (np.zeros((2, 63), np.float32), "expected shape [-1, 64], got [2, 63]"),
        (np.zeros((64,), np.float32), "expected 2 dimensions"),
        (np.zeros((0, 64), np.float32), "the batch is empty"),
        (np.array([["x"] * 64]), "expected float32, got <U1"),
        (np.full((1, 64), np.nan, np.float32), "NaN or infinity"),
    ],
)
def test_input_is_checked_against_the_manifest(model_repo, data, message):
    manifest = load_manifest(model_repo / "digits")
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate_input(manifest.input, data)


def test_integer_input_converts_to_float(model_repo):
    manifest = load_manifest(model_repo / "digits")
    out = validate_input(manifest.input, np.ones((3, 64), dtype=np.int64))
    assert out.dtype == np.float32 and out.flags.c_contiguous
