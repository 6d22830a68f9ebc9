"""The ecosystem manifest (`ecosystem.yaml`) and its validation.

A model repository holds one folder per ecosystem::

    <repository>/<ecosystem>/ecosystem.yaml
    <repository>/<ecosystem>/<member>/<version>/model.onnx
    <repository>/<ecosystem>/heldout.npz          (optional: the held-out split)

This module knows nothing of ONNX Runtime, Ray or HTTP: it only reads and
validates the manifest, so a bad manifest fails with the file, the field and the
bad value before anything is loaded.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "ManifestError",
    "TensorSpec",
    "MemberSpec",
    "StageSpec",
    "RegressionSpec",
    "RankingSpec",
    "EcosystemManifest",
    "MANIFEST_NAME",
    "load_manifest",
    "describe_validation_error",
    "list_ecosystems",
]

MANIFEST_NAME = "ecosystem.yaml"
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_DTYPES = ("float32", "float64", "int64", "int32")


def _check_name(v: str) -> str:
    if not _NAME.match(v):
        raise ValueError(f"must match {_NAME.pattern}, got {v!r}")
    return v


def describe_validation_error(err: ValidationError, prefix: str = "") -> list[str]:
    """One line per problem: `(prefix.)key.path: message (got VALUE)` (shared by every config reader)."""
    lines = []
    for e in err.errors():
        loc = ".".join([prefix] * bool(prefix) + [str(x) for x in e["loc"]]) or "(top level)"
        bad = e.get("input")
        shown = "{...}" if isinstance(bad, dict) else repr(bad)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        lines.append(f"{loc}: {e['msg']} (got {shown})")
    return lines


class ManifestError(ValueError):
    """A manifest could not be read or is invalid; the message names file, field and value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """One input tensor: name, shape (-1 = any size, first axis is the batch), dtype."""

    name: str = Field(min_length=1, description="tensor name as in the ONNX graph")
    shape: tuple[int, ...] = Field(min_length=1, description="shape, -1 for the batch axis")
    dtype: Literal["float32", "float64", "int64", "int32"] = Field(description="element type")

    @field_validator("shape")
    @classmethod
    def _dims(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        if shape[0] != -1:
            raise ValueError(f"first axis must be the batch axis -1, got {shape[0]}")
        for d in shape[1:]:
            if d <= 0:
                raise ValueError(f"non-batch dimensions must be positive, got {d}")
        return shape

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.shape[1:]


class RemoteSpec(_Strict):
    """An Open Inference Protocol v2 endpoint serving a member (another platform, a vendor's API)."""

    url: str = Field(description="base URL of the server, e.g. http://triton:8000")
    model: str = Field(min_length=1, description="the model name on that server")
    version: str | None = Field(default=None, description="the model version on that server (default: its choice)")
    token_env: str | None = Field(default=None, description="environment variable holding a bearer token to send")
    timeout_s: float = Field(default=2.0, gt=0, le=300, description="a slower answer is a missing output (timeout)")
    max_concurrency: int = Field(default=16, ge=1, le=4096, description="calls in flight to this endpoint at most")
    output: str = Field(default="label", description="the output holding class ids or names (regression: values)")
    probability_output: str | None = Field(default=None, description="the output holding class scores, if any")
    binary: bool = Field(default=False, description="send and ask for binary tensors instead of JSON")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, got {v!r}")
        return v.rstrip("/")


class StageSpec(_Strict):
    """One stage of a pipeline member: an ONNX file whose `output` feeds the next stage's input.

    The last stage's outputs are the member's (the ecosystem's `label_output` and
    `probability_output`). A stage whose `label_output` is set predicts the ecosystem's classes
    itself: its own correctness is judged against the ecosystem's labels (a stage label)."""

    name: str = Field(description="stage name, lower-case identifier")
    version: str = Field(min_length=1, max_length=32, description="the stage's version string")
    path: str = Field(description="path of the stage's model.onnx relative to the ecosystem folder")
    input: str = Field(default="input", min_length=1, description="the graph input this stage reads")
    output: str | None = Field(default=None, description="the output passed to the next stage (every stage "
                               "but the last)")
    label_output: str | None = Field(default=None, description="an output of class ids of the ecosystem's "
                                     "classes: the stage's own prediction, judged against the labels")
    probability_output: str | None = Field(default=None, description="with label_output: the stage's class scores")

    _name = field_validator("name")(classmethod(lambda cls, v: _check_name(v)))

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        return _model_path(v)


def _model_path(v: str) -> str:
    p = Path(v)
    if p.is_absolute() or ".." in p.parts or p.name != "model.onnx":
        raise ValueError(f"must be a relative path ending in model.onnx, got {v!r}")
    return v


class MemberSpec(_Strict):
    """One member version of an ecosystem: an ONNX file in the repository (`kind: onnx`), a
    chain of ONNX stages (`kind: pipeline`), or a model served elsewhere over the Open Inference
    Protocol (`kind: remote`)."""

    name: str = Field(description="member name, lower-case identifier")
    version: str = Field(min_length=1, max_length=32, description="version string")
    kind: Literal["onnx", "pipeline", "remote", "external"] = Field(
        default="onnx", description="onnx: a local file; pipeline: a chain of local files (stages); remote: an "
        "endpoint; external: its outputs arrive from outside (POST /v2/outcomes), it is never called")
    path: str | None = Field(default=None, description="kind onnx: path of model.onnx relative to the ecosystem folder")
    remote: RemoteSpec | None = Field(default=None, description="kind remote: the endpoint")
    stages: tuple[StageSpec, ...] = Field(default=(), description="kind pipeline: the stages, first to last")
    compressed: bool = Field(default=False, description="a compressed (e.g. quantized) variant")
    family: str = Field(default="", description="model family, for people reading the manifest")
    compressed_from: str | None = Field(default=None, description="member it was compressed from")

    _name = field_validator("name")(classmethod(lambda cls, v: _check_name(v)))

    @field_validator("path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        return v if v is None else _model_path(v)

    @property
    def onnx_path(self) -> str:
        """The model file's path in the ecosystem folder (kind onnx)."""
        if self.path is None:
            raise ValueError(f"member {self.name!r} is {self.kind}: it has no model file")
        return self.path

    @property
    def local(self) -> bool:
        """Run here from files in the repository (kinds onnx and pipeline)."""
        return self.kind in ("onnx", "pipeline")

    @property
    def model_paths(self) -> list[str]:
        """The model files it runs, relative to the ecosystem folder (none for remote, external)."""
        if self.kind == "pipeline":
            return [s.path for s in self.stages]
        return [self.path] if self.path is not None else []

    @model_validator(mode="after")
    def _kind(self) -> MemberSpec:
        if self.kind == "onnx" and (self.path is None or self.remote is not None):
            raise ValueError(f"member {self.name!r}: kind onnx needs a path and no remote")
        if self.kind == "remote" and (self.remote is None or self.path is not None):
            raise ValueError(f"member {self.name!r}: kind remote needs a remote endpoint and no path")
        if self.kind == "external" and (self.remote is not None or self.path is not None):
            raise ValueError(f"member {self.name!r}: kind external has no path and no remote")
        if self.kind == "pipeline":
            if self.path is not None or self.remote is not None or len(self.stages) < 2:
                raise ValueError(f"member {self.name!r}: kind pipeline needs at least 2 stages and no path or remote")
            names = [s.name for s in self.stages]
            if len(set(names)) != len(names):
                raise ValueError(f"member {self.name!r}: stage names must be distinct, got {names}")
            for s in self.stages[:-1]:
                if s.output is None:
                    raise ValueError(f"member {self.name!r}: stage {s.name!r} needs an output (what the next stage reads)")
            if self.stages[-1].output is not None:
                raise ValueError(f"member {self.name!r}: the last stage {self.stages[-1].name!r} has no output to pass "
                                 "on (the member's outputs are the ecosystem's label_output and probability_output)")
            for s in self.stages:
                if s.probability_output is not None and s.label_output is None:
                    raise ValueError(f"member {self.name!r}: stage {s.name!r}: probability_output needs label_output")
        elif self.stages:
            raise ValueError(f"member {self.name!r}: stages are for kind pipeline only")
        return self


MAX_BINS = 256


class RegressionSpec(_Strict):
    """How a regression ecosystem's outputs are judged and compared.

    A member is correct when |prediction - label| <= `tolerance` (docs/design.md, "Metric definitions").
    Label-free metrics (agreement, kappa, unanimity, ambiguity, discrepancy, CIE, the
    exploration estimators' "same output") need outputs that are equal or not, so they
    compare predictions by bin: bins of `bin_width` (default: the tolerance) over `range`,
    values outside it falling into the first or last bin. Two outputs agree when they land
    in the same bin. The bins bound the label values and the count arrays (at most 256).
    """

    tolerance: float = Field(gt=0, description="a prediction within this distance of the label is correct")
    range: tuple[float, float] = Field(description="[low, high] of the values the bins cover")
    bin_width: float | None = Field(default=None, gt=0, description="agreement bin width; default: the tolerance")

    @model_validator(mode="after")
    def _bins(self) -> RegressionSpec:
        lo, hi = self.range
        if not (lo < hi) or not all(map(math.isfinite, self.range)):
            raise ValueError(f"range must be two finite numbers, low < high, got {list(self.range)}")
        if not math.isfinite(self.tolerance):
            raise ValueError(f"tolerance must be finite, got {self.tolerance}")
        if self.n_bins > MAX_BINS:
            raise ValueError(f"range / bin_width gives {self.n_bins} bins; at most {MAX_BINS} (widen bin_width)")
        return self

    @property
    def width(self) -> float:
        return self.bin_width if self.bin_width is not None else self.tolerance

    @property
    def n_bins(self) -> int:
        lo, hi = self.range
        return max(1, math.ceil((hi - lo) / self.width - 1e-9))

    def bin_names(self) -> tuple[str, ...]:
        lo, w = self.range[0], self.width
        return tuple(f"[{lo + i * w:g},{lo + (i + 1) * w:g})" for i in range(self.n_bins))


class RankingSpec(_Strict):
    """How a ranking ecosystem's members are read and judged.

    Members score every item of the catalogue (the ecosystem's `classes`) for a context; a
    member's list is its `k` highest-scoring items (ties: the lower item id first). The served
    member's list is what the caller shows. A label is the item clicked, or `no_click` (posted, or
    assumed after a timeout). A member is correct on a click when the clicked item is in its list."""

    k: int = Field(ge=1, le=100, description="list length: the top-k items returned and recorded per member")
    no_click: str = Field(default="no_click", min_length=1, description="the label meaning 'nothing was clicked'")


class EcosystemManifest(_Strict):
    """The manifest of one ecosystem (one endpoint)."""

    name: str = Field(description="ecosystem name; the folder name")
    task: Literal["classification", "regression", "ranking"] = Field(description="task kind")
    description: str = ""
    input: TensorSpec
    label_output: str = Field(default="label", description="ONNX output holding the class (or the value)")
    probability_output: str | None = Field(default="probabilities", description="ONNX output of class scores")
    classes: tuple[str, ...] = Field(default=(), description="class labels, index = class id (classification)")
    regression: RegressionSpec | None = Field(default=None, description="tolerance and agreement bins (regression)")
    ranking: RankingSpec | None = Field(default=None, description="list length and the no-click label (ranking)")
    members: tuple[MemberSpec, ...] = Field(min_length=1)
    subgroups: dict[str, tuple[str, ...]] = Field(
        default_factory=dict, description="declared subgroup attributes and their allowed values"
    )
    intersections: tuple[tuple[str, ...], ...] = Field(
        default=(), description="declared intersections of subgroup attributes"
    )
    heldout: str | None = Field(default=None, description="held-out split (.npz), relative path")

    _name = field_validator("name")(classmethod(lambda cls, v: _check_name(v)))

    @field_validator("subgroups")
    @classmethod
    def _subgroups(cls, v: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        for attr, values in v.items():
            if not _NAME.match(attr):
                raise ValueError(f"attribute name must match {_NAME.pattern}, got {attr!r}")
            if len(values) < 1 or len(set(values)) != len(values):
                raise ValueError(f"attribute {attr!r} needs distinct values, got {list(values)}")
            if "other" in values:
                raise ValueError(f"attribute {attr!r}: 'other' is reserved for undeclared values")
        return v

    @model_validator(mode="after")
    def _cross(self) -> EcosystemManifest:
        if self.task == "ranking":
            if self.ranking is None:
                raise ValueError("task ranking needs 'ranking' settings (k)")
            if self.regression is not None:
                raise ValueError("'regression' settings are for task regression only")
            if len(self.classes) < self.ranking.k:
                raise ValueError(f"task ranking: the catalogue (classes) has {len(self.classes)} items, fewer than "
                                 f"k = {self.ranking.k}")
            if self.ranking.no_click in self.classes:
                raise ValueError(f"task ranking: the no-click label {self.ranking.no_click!r} is also an item")
            if self.probability_output is None:
                raise ValueError("task ranking needs probability_output: the members' scores of every item")
        elif self.ranking is not None:
            raise ValueError("'ranking' settings are for task ranking only")
        if self.task == "classification":
            if len(self.classes) < 2:
                raise ValueError(f"task classification needs at least 2 classes, got {list(self.classes)}")
            if self.regression is not None:
                raise ValueError("'regression' settings are for task regression only")
        elif self.task == "regression":
            if self.regression is None:
                raise ValueError("task regression needs 'regression' settings (tolerance, range)")
            if self.classes:
                raise ValueError("task regression has no classes")
            if self.probability_output is not None:
                raise ValueError("task regression has no probability_output (set it to null)")
        seen: set[tuple[str, str]] = set()
        for m in self.members:
            key = (m.name, m.version)
            if key in seen:
                raise ValueError(f"member {m.name!r} version {m.version!r} is listed twice")
            seen.add(key)
        names = {m.name for m in self.members}
        for m in self.members:
            if self.task == "regression" and any(s.label_output for s in m.stages):
                raise ValueError(f"member {m.name!r}: a stage's label_output is for classification ecosystems")
            if m.compressed_from is not None and m.compressed_from not in names:
                raise ValueError(f"member {m.name!r}: compressed_from {m.compressed_from!r} is not a member")
        for combo in self.intersections:
            for attr in combo:
                if attr not in self.subgroups:
                    raise ValueError(f"intersection {list(combo)} names undeclared attribute {attr!r}")
            if len(combo) < 2:
                raise ValueError(f"intersection {list(combo)} needs at least two attributes")
        return self

    @property
    def label_classes(self) -> tuple[str, ...]:
        """The labels a classification or ranking ecosystem takes: its classes, and for ranking
        its items then the no-click label (class id len(classes))."""
        return self.classes + ((self.ranking.no_click,) if self.ranking is not None else ())

    @property
    def member_keys(self) -> list[str]:
        """Members as `name` (latest listed version wins when a name repeats)."""
        return list(dict.fromkeys(m.name for m in self.members))

    def current_members(self) -> list[MemberSpec]:
        """One version per member name: the last one listed (the current version)."""
        latest: dict[str, MemberSpec] = {}
        for m in self.members:
            latest[m.name] = m
        return list(latest.values())

    def served_members(self, pins: Mapping[str, str] | None = None) -> list[MemberSpec]:
        """`current_members`, with the versions `pins` names (member -> version) in place of the
        last listed ones (an ecosystem config's `versions`, what `ecoserve rollout` writes)."""
        return [self.member(m.name, pins[m.name]) if pins and m.name in pins else m for m in self.current_members()]

    def versions_of(self, name: str) -> list[str]:
        return [m.version for m in self.members if m.name == name]

    def member(self, name: str, version: str | None = None) -> MemberSpec:
        for m in reversed(self.members):
            if m.name == name and (version is None or m.version == version):
                return m
        raise KeyError(f"ecosystem {self.name!r} has no member {name!r}" + (f" version {version!r}" if version else ""))


def _describe(err: ValidationError, source: Path) -> str:
    return "\n".join(f"{source}: field '{line.split(': ', 1)[0]}': {line.split(': ', 1)[1]}"
                     for line in describe_validation_error(err))


def load_manifest(path: str | Path) -> EcosystemManifest:
    """Read and validate one `ecosystem.yaml` (or an ecosystem folder holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    try:
        raw = yaml.safe_load(p.read_text())
    except FileNotFoundError as exc:
        raise ManifestError(f"{p}: no such manifest") from exc
    except yaml.YAMLError as exc:
        raise ManifestError(f"{p}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ManifestError(f"{p}: field '(top level)': expected a mapping (got {type(raw).__name__})")
    try:
        manifest = EcosystemManifest.model_validate(raw)
    except ValidationError as exc:
        raise ManifestError(_describe(exc, p)) from exc
    if manifest.name != p.parent.name:
        raise ManifestError(f"{p}: field 'name': must equal the folder name {p.parent.name!r} (got {manifest.name!r})")
    return manifest


def list_ecosystems(repository: str | Path) -> list[str]:
    """Names of the ecosystems in a model repository (folders holding a manifest)."""
    root = Path(repository)
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if (d / MANIFEST_NAME).is_file())
