"""The Ray Serve application: `serving.app:build_app` is the import path in every config.

Deployments:
- `Gateway`: the ingress (FastAPI, Open Inference Protocol). With `placement:
  colocated` (the default, chosen from measurements: docs/serving.md) it also
  hosts every member's ONNX Runtime session, each with `@serve.batch`.
- `<ecosystem>-<member>-v<version>` (`placement: per_member`): one deployment per member
  version (a candidate version in shadow gets its own), with its own fractional
  `num_cpus`/`num_gpus`, `@serve.batch`, reached by handles. The version is in the name, so a
  rollout creates a new deployment instead of changing what an existing one runs under a
  gateway that still records the old version. (A redeploy restarts every deployment of the
  application: Serve versions them together when the application's args change.)

`serve run CONFIG.yaml`, `serve deploy CONFIG.yaml`, KubeRay's `serveConfigV2` and
`ecoserve serve CONFIG.yaml` all go through `build_app(args)`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from ray import serve
from ray.serve import Application

from models.manifest import EcosystemManifest, MemberSpec, load_manifest
from models.runtime import load_member
from serving.config import BatchingConfig, FaultConfig, ServingConfig, parse_serving
from serving.dataplane import Dataplane
from serving.grpc_adapter import GrpcService
from serving.http import build_http_app
from serving.members import BatchedLocalMember, LocalMember, MemberCall, Prediction, RemoteMember
from serving.recording.deployment import HandleTelemetry, RecorderDeployment
from serving.recording.host import LocalTelemetry, RecorderHost, recorder_specs
from serving.recording.process import RecorderProcess
from serving.recording.shipper import OutcomeShipper, Reclaim, Send
from telemetry.ledger import Ledger
from telemetry.records import Outcome

__all__ = ["build_app", "Gateway", "MemberDeployment", "RecorderLink", "link_recorder", "member_factory"]

log = logging.getLogger("ray.serve")


@serve.deployment(name="Member")
class MemberDeployment:
    """One member version as its own deployment (placement: per_member)."""

    def __init__(self, repository: str, ecosystem: str, member: str, version: str, provider: str,
                 batching: dict[str, Any], fault: dict[str, Any] | None) -> None:
        # only what this member needs, not the whole config (Serve still gives every deployment of
        # the application a new version on a redeploy, so a rollout restarts member replicas too)
        d = Path(repository) / ecosystem
        manifest = load_manifest(d)
        spec = manifest.member(member, version)
        session = load_member(d, manifest, spec, provider)  # type: ignore[arg-type]
        log.info("member %s.%s v%s loaded on %s", ecosystem, member, version, session.provider)
        self._member = BatchedLocalMember(session, BatchingConfig.model_validate(batching),
                                          FaultConfig.model_validate(fault) if fault else None)

    async def predict(self, x: np.ndarray) -> Prediction:
        result: Prediction = await self._member.predict(x)
        return result

    def provider(self) -> str:
        return str(self._member.provider)


GC_THRESHOLD = (10_000, 10, 10)


def tune_gc() -> None:
    """Garbage collection for a request-serving process, the usual server tuning (measured here):
    freeze what start-up built (models, modules, Ray and FastAPI) so that full collections no
    longer walk it, and run the young collection every 10,000 allocations instead of 700. Each
    request allocates and frees a few hundred objects; queued outcome records live until their
    hand-over, so with CPython's defaults the gateway spent 0.63 s (telemetry off) and 1.36 s (on)
    collecting per 3,200 requests of 32 rows; tuned: 0.35 s and 0.42 s. `ECOSERVE_GC_TUNING=0` keeps
    CPython's defaults."""
    if os.environ.get("ECOSERVE_GC_TUNING", "1") == "0":
        return
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


class RecorderLink(NamedTuple):
    """How a gateway reaches its recorder: the feedback and /metrics backend, the hand-over and
    reclaim calls, and the recorder it owns and must close (None: another deployment owns it)."""

    telemetry: HandleTelemetry | LocalTelemetry
    send: Send
    reclaim: Reclaim
    owned: RecorderHost | RecorderProcess | None


def link_recorder_deployment(recorder: Any) -> RecorderLink:
    """The recorder is its own deployment (several gateway replicas): calls go through its handle."""

    async def send(batch: list[Outcome], reporter: str, report: dict[str, Any]) -> dict[str, Any]:
        reply: dict[str, Any] = await recorder.record.remote(batch, reporter, report)
        return reply

    async def reclaim(ledger: str, accepted: dict[str, int]) -> dict[str, int]:
        lost: dict[str, int] = await recorder.reclaim.remote(ledger, accepted)
        return lost

    return RecorderLink(HandleTelemetry(recorder), send, reclaim, None)


def link_recorder_in_gateway(cfg: ServingConfig) -> RecorderLink:
    """The recorder runs with this gateway (one replica): in a child process (the default: its
    counting and store writes off the gateway's GIL) or on a thread of the gateway's process.
    Blocking calls run on a thread, off the event loop."""
    t = cfg.telemetry
    settings = t.model_copy(update={"store_url": t.resolved_store_url(), "store_url_env": None}).model_dump(mode="json")
    host: RecorderHost | RecorderProcess
    if t.recorder_process:
        host = RecorderProcess(recorder_specs(cfg), settings, nice=t.recorder_process_nice)
    else:
        host = RecorderHost(recorder_specs(cfg), settings)

    async def send(batch: list[Outcome], reporter: str, report: dict[str, Any]) -> dict[str, Any]:
        reply: dict[str, Any] = await asyncio.to_thread(host.record, batch, reporter, report)
        return reply

    async def reclaim(ledger: str, accepted: dict[str, int]) -> dict[str, int]:
        return await asyncio.to_thread(host.reclaim, ledger, accepted)

    return RecorderLink(LocalTelemetry(host), send, reclaim, host)


def link_recorder(cfg: ServingConfig, recorder: Any) -> RecorderLink | None:
    """The placement decision: a recorder deployment's handle when one was bound, else the
    recorder in this gateway when telemetry is on (`ServingConfig.recorder_in_gateway`), else none."""
    if recorder is not None:
        return link_recorder_deployment(recorder)
    if cfg.telemetry.enabled and cfg.recorder_in_gateway():
        return link_recorder_in_gateway(cfg)
    return None


def member_factory(cfg: ServingConfig, member_handles: dict[str, Any] | None,
                   providers: dict[str, str]) -> Callable[[Path, EcosystemManifest, MemberSpec], MemberCall]:
    """How the data plane gets each member: a handle to its own deployment (placement: per_member)
    or an ONNX Runtime session in this replica (colocated)."""

    def factory(d: Path, manifest: EcosystemManifest, spec: MemberSpec) -> MemberCall:
        key = f"{manifest.name}.{spec.name}"
        if member_handles:
            if cfg.ecosystems[manifest.name].candidates.get(spec.name) == spec.version:  # a candidate's own deployment
                key = f"{key}@{spec.version}"
            return RemoteMember(member_handles[key], spec.name, spec.version, providers[key])
        fault = cfg.ecosystems[manifest.name].faults.get(spec.name)
        session = load_member(d, manifest, spec, cfg.provider)
        log.info("member %s v%s loaded on %s", key, spec.version, session.provider)
        return LocalMember(session, fault)

    return factory


@serve.deployment(name="Gateway")
@serve.ingress()
class Gateway:
    async def __init__(  # type: ignore[misc]  # Serve awaits an async constructor
        self, config: dict[str, Any], member_handles: dict[str, Any] | None = None, recorder: Any = None
    ) -> None:
        cfg = ServingConfig.model_validate(config)
        self.credentials = cfg.auth.credentials()
        providers = {key: await handle.provider.remote() for key, handle in (member_handles or {}).items()}
        link = link_recorder(cfg, recorder)
        self.telemetry = link.telemetry if link else None
        self.host = link.owned if link else None
        self.shipper: OutcomeShipper | None = None
        if link is not None:
            t = cfg.telemetry
            # crash accounting of this replica's queue: see telemetry.ledger
            ledger = Ledger(t.resolved_ledger_dir(), uuid.uuid4().hex[:16], list(cfg.ecosystems), t.store_key())
            self.shipper = OutcomeShipper(
                link.send, max_queue=t.max_queue, max_batch=t.max_batch, flush_interval_s=t.flush_interval_s,
                on_reply=self._apply_rewards, report=self._report,
                ledger=ledger, reclaim=link.reclaim,
            )
        self.dataplane = Dataplane.build(cfg, member_factory(cfg, member_handles, providers),
                                         sink=self.shipper.put if self.shipper else None)
        self.grpc = GrpcService(self.dataplane, self.credentials)
        if self.shipper is not None:
            self.shipper.start()
        if not member_handles:  # colocated: batch at the ecosystem level (members batch themselves otherwise)
            for runner in self.dataplane.runners.values():
                runner.enable_batching(cfg.batching.max_batch_size, cfg.batching.batch_wait_timeout_s)
        tune_gc()

    # ----------------------------------------- gRPC (inference.GRPCInferenceService)
    # Ray Serve's gRPC ingress calls the ingress deployment's method named like the RPC;
    # `grpc_context` (by that name) lets a method set the status code (serving.grpc_adapter)
    async def ServerLive(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802 - the protocol's names
        return await self.grpc.ServerLive(request, grpc_context)

    async def ServerReady(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return await self.grpc.ServerReady(request, grpc_context)

    async def ServerMetadata(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return await self.grpc.ServerMetadata(request, grpc_context)

    async def ModelReady(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return await self.grpc.ModelReady(request, grpc_context)

    async def ModelMetadata(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return await self.grpc.ModelMetadata(request, grpc_context)

    async def ModelInfer(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return await self.grpc.ModelInfer(request, grpc_context)

    def _report(self) -> dict[str, Any]:
        """What each hand-over tells the recorder: serving stats, and the estimator versions held."""
        versions = {eco: r.estimator.version for eco, r in self.dataplane.runners.items() if r.estimator is not None}
        return {**self.dataplane.stats.snapshot(), "estimator_versions": versions}

    def _apply_rewards(self, reply: dict[str, Any]) -> None:
        """Policies learn from labels: the recorder's reward totals replace the observed counts; a
        newly fitted estimator replaces the runner's (per-row systemic failure risk)."""
        for eco, (successes, failures) in reply.get("rewards", {}).items():
            runner = self.dataplane.runners.get(eco)
            if runner is not None:
                runner.policy.set_stats(successes, failures)
        self.dataplane.apply_estimators(reply.get("estimators") or {})

    async def flush(self) -> int:
        """Hand every queued outcome to the recorder now (called before a planned shutdown)."""
        return await self.shipper.flush(poll=False, drain=True) if self.shipper else 0

    async def __del__(self) -> None:
        # graceful shutdown: zero records lost from this replica's queue
        if self.shipper is not None:
            await self.shipper.close()
        if self.host is not None:
            self.host.close()

    def __serve_build_asgi_app__(self) -> Any:
        return build_http_app(self.dataplane, self.telemetry, self.credentials,
                              self.shipper.health if self.shipper else None)


def _actor_options(num_cpus: float, num_gpus: float) -> dict[str, Any]:
    opts: dict[str, Any] = {"num_cpus": num_cpus}
    if num_gpus:
        opts["num_gpus"] = num_gpus
    return opts


def build_app(args: dict[str, Any]) -> Application:
    """Application builder: validates the ecoserve args and binds the deployments."""
    cfg = parse_serving(args)
    # replicas may not share the driver's working directory: pin the repository path now
    cfg = cfg.model_copy(update={"model_repository": str(Path(cfg.model_repository).resolve())})
    if not cfg.telemetry.store_url_env:  # a relative SQLite path is pinned here too
        cfg = cfg.model_copy(update={"telemetry": cfg.telemetry.model_copy(
            update={"store_url": cfg.telemetry.resolved_store_url()})})
    config = cfg.model_dump(mode="json")
    handles: dict[str, Any] | None = None
    if cfg.placement == "per_member":
        handles = {}
        repo = Path(cfg.model_repository)
        for eco, eco_cfg in cfg.ecosystems.items():
            manifest = load_manifest(repo / eco)
            current = {m.name: m for m in manifest.served_members(eco_cfg.versions)}
            runs = [(name, current[name].version, "") for name in eco_cfg.members or list(current)]
            runs += [(name, version, f"@{version}") for name, version in eco_cfg.candidates.items()]
            for name, version, suffix in runs:
                if not current[name].local:  # remote: called over HTTP from the gateway; external: never called
                    continue
                res = eco_cfg.member_resources.get(name, cfg.members)
                handles[f"{eco}.{name}{suffix}"] = MemberDeployment.options(  # type: ignore[attr-defined]
                    name=f"{eco}-{name}-v{version}".replace("_", "-"),
                    num_replicas=res.num_replicas,
                    ray_actor_options=_actor_options(res.num_cpus, res.num_gpus),
                    max_ongoing_requests=max(100, cfg.batching.max_batch_size * 2),
                    graceful_shutdown_timeout_s=5,
                    graceful_shutdown_wait_loop_s=0.5,
                ).bind(str(repo), eco, name, version, cfg.provider, cfg.batching.model_dump(mode="json"),
                       f.model_dump(mode="json") if (f := eco_cfg.faults.get(name)) else None)
    recorder = None
    if cfg.telemetry.enabled and not cfg.recorder_in_gateway():
        t = cfg.telemetry
        # a relative SQLite path is pinned here (replicas may run elsewhere); a URL from the
        # environment (a Secret) is read in the recorder replica, never put in the app's args
        telemetry = t if t.store_url_env else t.model_copy(update={"store_url": t.resolved_store_url()})
        recorder = RecorderDeployment.options(
            num_replicas=1,  # one writer: the store and the counters live here
            ray_actor_options=_actor_options(t.recorder.num_cpus, 0),
        ).bind(recorder_specs(cfg), telemetry.model_dump(mode="json"))
    auto = cfg.gateway.autoscaling
    replicas: dict[str, Any] = {"num_replicas": cfg.gateway.num_replicas} if auto is None else {
        "autoscaling_config": auto.model_dump()}
    return Gateway.options(  # type: ignore[attr-defined,no-any-return]
        **replicas,
        # in-flight requests are small and fast: do not hold a shutdown for Serve's default 20 s
        graceful_shutdown_timeout_s=5,
        graceful_shutdown_wait_loop_s=0.5,
        ray_actor_options=_actor_options(cfg.gateway.num_cpus, cfg.gateway.num_gpus),
        max_ongoing_requests=max(100, cfg.batching.max_batch_size * 4),
    ).bind(config, handles, recorder)
