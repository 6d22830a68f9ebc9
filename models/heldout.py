"""The held-out split saved beside each ecosystem, and offline predictions on it.

`heldout.npz` holds `X` (inputs), `y` (class ids, or true values of a regression ecosystem) and `group_<attr>` (subgroup
values as strings). `write_predictions_csv` runs every current member directly
in ONNX Runtime over the split and writes the table `ecoserve analyze` reads.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.manifest import EcosystemManifest, load_manifest
from models.runtime import ProviderChoice, load_member, validate_input

__all__ = ["Heldout", "load_heldout", "member_predictions", "write_predictions_csv"]


@dataclass(frozen=True)
class Heldout:
    X: np.ndarray
    y: np.ndarray
    groups: dict[str, np.ndarray]


def load_heldout(ecosystem_dir: str | Path, manifest: EcosystemManifest | None = None) -> Heldout:
    d = Path(ecosystem_dir)
    manifest = manifest or load_manifest(d)
    if manifest.heldout is None:
        raise FileNotFoundError(f"{d}: the manifest declares no held-out split")
    with np.load(d / manifest.heldout, allow_pickle=False) as z:
        groups = {k[len("group_") :]: z[k] for k in z.files if k.startswith("group_")}
        return Heldout(X=z["X"], y=z["y"], groups=groups)


def member_predictions(
    ecosystem_dir: str | Path, provider: ProviderChoice = "cpu"
) -> tuple[EcosystemManifest, Heldout, dict[str, np.ndarray]]:
    """Every current member's class ids (regression: values) on the held-out split, straight from ONNX Runtime."""
    d = Path(ecosystem_dir)
    manifest = load_manifest(d)
    held = load_heldout(d, manifest)
    X = validate_input(manifest.input, held.X)
    preds = {}
    for spec in manifest.current_members():
        session = load_member(d, manifest, spec, provider)
        preds[spec.name] = session.predict(X)[0]
    return manifest, held, preds


def write_predictions_csv(ecosystem_dir: str | Path, out: str | Path, provider: ProviderChoice = "cpu") -> int:
    """Write label, one column per member, and the subgroup columns; returns the row count."""
    manifest, held, preds = member_predictions(ecosystem_dir, provider)
    names = list(preds)
    with Path(out).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", *names, *held.groups])
        for i in range(held.y.shape[0]):
            if manifest.task == "regression":  # the values as they are
                cells = [repr(float(held.y[i]))] + [repr(float(preds[n][i])) for n in names]
            else:
                cells = [manifest.classes[int(held.y[i])]] + [manifest.classes[int(preds[n][i])] for n in names]
            w.writerow(cells + [str(g[i]) for g in held.groups.values()])
    return int(held.y.shape[0])
