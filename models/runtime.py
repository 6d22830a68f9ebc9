"""ONNX Runtime sessions for ecosystem members, with a deliberate provider choice.

`auto` asks for CUDA only where it can really load: a CUDA driver that reports at
least one device. Only then is `onnxruntime.preload_dlls()` called (on a CPU
machine it prints "Failed to load libcublas..." lines, and a CUDA session request
logs an error per session). Each session reports the provider it really got.

Knows nothing of Ray or HTTP.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from models.manifest import EcosystemManifest, MemberSpec, StageSpec, TensorSpec

__all__ = [
    "ProviderChoice",
    "InputError",
    "ProviderError",
    "cuda_device_count",
    "resolve_providers",
    "validate_input",
    "MemberSession",
    "PipelineSession",
    "STAGE_FIELDS",
    "load_member",
]

log = logging.getLogger(__name__)

ProviderChoice = Literal["auto", "cuda", "cpu"]
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class InputError(ValueError):
    """An input tensor does not match the manifest (shape, dtype, values)."""


class ProviderError(RuntimeError):
    """The requested execution provider cannot be used here."""


@functools.cache
def cuda_device_count() -> int:
    """CUDA devices the driver reports; 0 where there is no driver or no device."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    try:
        if lib.cuInit(0) != 0:
            return 0
        count = ctypes.c_int(0)
        if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return int(count.value)
    except AttributeError:
        return 0


@functools.cache
def _preload_cuda_libraries() -> None:
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        preload()


def resolve_providers(choice: ProviderChoice) -> list[str]:
    """The provider list to ask ONNX Runtime for, given the user's choice."""
    import onnxruntime as ort

    if choice == "cpu":
        return [CPU]
    has_ep = CUDA in ort.get_available_providers()
    has_device = cuda_device_count() > 0
    if choice == "cuda":
        if not has_ep:
            raise ProviderError("provider 'cuda' requested but this onnxruntime build has no CUDAExecutionProvider")
        if not has_device:
            raise ProviderError("provider 'cuda' requested but no CUDA device is visible (libcuda.so.1 reports none)")
        _preload_cuda_libraries()
        return [CUDA, CPU]
    if choice == "auto":
        if has_ep and has_device:
            _preload_cuda_libraries()
            return [CUDA, CPU]
        return [CPU]
    raise ProviderError(f"provider must be one of auto, cuda, cpu (got {choice!r})")


_NP_DTYPES = {"float32": np.float32, "float64": np.float64, "int64": np.int64, "int32": np.int32}


def validate_input(spec: TensorSpec, data: np.ndarray) -> np.ndarray:
    """Check a batch against the manifest's input spec; return it C-contiguous, right dtype.

    Integers may be given for float inputs (they convert exactly); floats for an
    integer input are an error, as are NaN/inf for float inputs.
    """
    want = np.dtype(_NP_DTYPES[spec.dtype])
    if data.ndim != len(spec.shape):
        raise InputError(
            f"input '{spec.name}': expected {len(spec.shape)} dimensions {list(spec.shape)}, got shape {list(data.shape)}"
        )
    if tuple(data.shape[1:]) != spec.row_shape:
        raise InputError(f"input '{spec.name}': expected shape {list(spec.shape)}, got {list(data.shape)}")
    if data.shape[0] == 0:
        raise InputError(f"input '{spec.name}': the batch is empty")
    kind = data.dtype.kind
    if want.kind == "f":
        if kind not in "fiub":
            raise InputError(f"input '{spec.name}': expected {spec.dtype}, got {data.dtype}")
        out = np.ascontiguousarray(data, dtype=want)
        if not np.isfinite(out).all():
            raise InputError(f"input '{spec.name}': contains NaN or infinity")
        return out
    if kind not in "iub":
        raise InputError(f"input '{spec.name}': expected {spec.dtype}, got {data.dtype}")
    return np.ascontiguousarray(data, dtype=want)


@dataclass
class MemberSession:
    """One member version loaded in ONNX Runtime."""

    ecosystem: str
    spec: MemberSpec
    input_spec: TensorSpec
    label_output: str
    probability_output: str | None
    provider: str
    _session: object
    regression: bool = False

    @property
    def key(self) -> str:
        return f"{self.ecosystem}.{self.spec.name}"

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Class ids (int64, shape [n]) and class scores ([n, classes]) for a validated batch; for a
        regression member, the values (float64, shape [n]; a non-finite value becomes NaN, a missing
        output) and None."""
        outputs = [self.label_output] + ([self.probability_output] if self.probability_output else [])
        result = self._session.run(outputs, {self.input_spec.name: batch})  # type: ignore[attr-defined]
        return self._finish(result)

    def _finish(self, result: list[Any]) -> tuple[np.ndarray, np.ndarray | None]:
        if self.regression:
            values = np.asarray(result[0], dtype=np.float64).reshape(-1)
            return np.where(np.isfinite(values), values, np.nan), None
        labels = np.asarray(result[0]).reshape(-1).astype(np.int64, copy=False)
        probs = np.asarray(result[1], dtype=np.float32) if self.probability_output else None
        return labels, probs


# per row and stage, what a pipeline records of the stage (`PipelineSession.predict`): its own
# class id (-1: none, no label_output), its score of that class (NaN: none) and a 48-bit
# fingerprint of the output it passed on (exact in a float64)
STAGE_FIELDS = ("class", "score", "fingerprint")


def _row_fingerprints(a: np.ndarray) -> np.ndarray:
    rows = np.ascontiguousarray(a).reshape(a.shape[0], -1)
    return np.array([int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=6).digest(), "big") for r in rows],
                    dtype=np.float64)


@dataclass
class PipelineSession(MemberSession):
    """A pipeline member: its stages' sessions, run in order, each stage's `output` fed to the
    next stage's `input` (as float32). `predict` returns the last stage's class ids and scores
    (or values) and, third, per row and stage the `STAGE_FIELDS` (shape [n, stages, 3])."""

    stages: tuple[tuple[StageSpec, object], ...] = ()

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:  # type: ignore[override]
        n = batch.shape[0]
        info = np.full((n, len(self.stages), len(STAGE_FIELDS)), np.nan)
        info[:, :, 0] = -1
        x = batch
        for k, (stage, session) in enumerate(self.stages[:-1]):
            names = [stage.output] + [o for o in (stage.label_output, stage.probability_output) if o]
            got = session.run(names, {stage.input: x})  # type: ignore[attr-defined]
            out = np.asarray(got[0])
            if out.ndim == 1:
                out = out.reshape(n, 1)
            if stage.label_output:
                own = np.asarray(got[1]).reshape(-1).astype(np.int64)
                info[:, k, 0] = own
                if stage.probability_output:
                    p = np.asarray(got[2], dtype=np.float64)
                    info[:, k, 1] = p[np.arange(n), np.clip(own, 0, p.shape[1] - 1)]
            info[:, k, 2] = _row_fingerprints(out)
            x = np.ascontiguousarray(out, dtype=np.float32)
        last_stage, last = self.stages[-1]
        outputs = [self.label_output] + ([self.probability_output] if self.probability_output else [])
        result = last.run(outputs, {last_stage.input: x})  # type: ignore[attr-defined]
        labels, probs = self._finish(result)
        info[:, -1, 2] = _row_fingerprints(np.asarray(result[-1]))
        if not self.regression:
            info[:, -1, 0] = labels
            if probs is not None:
                info[:, -1, 1] = probs[np.arange(n), np.clip(labels, 0, probs.shape[1] - 1)]
        return labels, probs, info


def _open(path: Path, providers: list[str], intra_op_threads: int) -> object:
    import onnxruntime as ort

    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file missing (run `ecoserve build-models`?)")
    opts = ort.SessionOptions()
    # Serving runs many small sessions side by side: one thread each avoids
    # oversubscribing the cores (measured: the default pool slows small batches).
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ProviderError(f"{path}: onnxruntime could not load the model: {exc}") from exc


def _load_pipeline(ecosystem_dir: Path, manifest: EcosystemManifest, member: MemberSpec, provider: ProviderChoice,
                   intra_op_threads: int) -> PipelineSession:
    providers = resolve_providers(provider)
    stages = []
    for k, stage in enumerate(member.stages):
        path = ecosystem_dir / stage.path
        session = _open(path, providers, intra_op_threads)
        graph_in = {i.name: i for i in session.get_inputs()}  # type: ignore[attr-defined]
        graph_out = [o.name for o in session.get_outputs()]  # type: ignore[attr-defined]
        if stage.input not in graph_in:
            raise ProviderError(f"{path}: stage {stage.name!r} input {stage.input!r} not in the graph's inputs "
                                f"{sorted(graph_in)}")
        last = k == len(member.stages) - 1
        wanted = [o for o in (stage.output, stage.label_output, stage.probability_output) if o]
        if last:
            wanted += [o for o in (manifest.label_output, manifest.probability_output) if o]
        for o in wanted:
            if o not in graph_out:
                raise ProviderError(f"{path}: stage {stage.name!r} output {o!r} not in the graph's outputs {graph_out}")
        stages.append((stage, session))
    got = stages[0][1].get_providers()[0]  # type: ignore[attr-defined]
    if provider == "cuda" and got != CUDA:
        raise ProviderError(f"{ecosystem_dir}: provider 'cuda' requested but member {member.name!r} got {got}")
    log.info("loaded %s.%s v%s (%d stages) on %s", manifest.name, member.name, member.version, len(stages), got)
    return PipelineSession(
        ecosystem=manifest.name, spec=member, input_spec=manifest.input, label_output=manifest.label_output,
        probability_output=manifest.probability_output, provider=got, _session=stages[-1][1],
        regression=manifest.task == "regression", stages=tuple(stages))


def load_member(
    ecosystem_dir: str | Path,
    manifest: EcosystemManifest,
    member: MemberSpec,
    provider: ProviderChoice = "auto",
    intra_op_threads: int = 1,
) -> MemberSession:
    """Open one member's model.onnx (a pipeline's stages) with the chosen provider; report what it
    really got."""
    import onnxruntime as ort

    if member.kind == "pipeline":
        return _load_pipeline(Path(ecosystem_dir), manifest, member, provider, intra_op_threads)
    path = Path(ecosystem_dir) / member.onnx_path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file missing (run `ecoserve build-models`?)")
    providers = resolve_providers(provider)
    opts = ort.SessionOptions()
    # Serving runs many small sessions side by side: one thread each avoids
    # oversubscribing the cores (measured: the default pool slows small batches).
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ProviderError(f"{path}: onnxruntime could not load the model: {exc}") from exc
    got = session.get_providers()[0]
    if provider == "cuda" and got != CUDA:
        raise ProviderError(f"{path}: provider 'cuda' requested but the session got {got}")
    names = [i.name for i in session.get_inputs()]
    if manifest.input.name not in names:
        raise ProviderError(f"{path}: manifest input {manifest.input.name!r} not in the graph's inputs {names}")
    log.info("loaded %s.%s v%s on %s", manifest.name, member.name, member.version, got)
    return MemberSession(
        ecosystem=manifest.name,
        spec=member,
        input_spec=manifest.input,
        label_output=manifest.label_output,
        probability_output=manifest.probability_output,
        provider=got,
        _session=session,
        regression=manifest.task == "regression",
    )
