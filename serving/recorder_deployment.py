"""The recorder as a Ray Serve deployment (one replica), and the gateway's view of it.

`RecorderDeployment` wraps `telemetry.Recorder`: it owns the store, runs the
assumed-label / pending-expiry sweep on a thread, and answers `record`,
`feedback` and `metrics` calls from the gateways. Errors cross the handle as
values (`{"error": ...}`), not exceptions, so the gateway can map them to 4xx.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any

from ray import serve

from models.manifest import load_manifest
from serving.config import PrimaryPolicyConfig, ServingConfig, TelemetryConfig
from serving.errors import UnprocessableEntity
from telemetry.metrics import exposition
from telemetry.recorder import EcosystemSpec, FeedbackError, LabelItem, Recorder
from telemetry.records import Outcome
from telemetry.store import OutcomeStore, open_store
from telemetry.store_process import StoreProcess

__all__ = ["RecorderDeployment", "RecorderHost", "recorder_specs", "HandleTelemetry", "LocalTelemetry", "feedback_reply"]

log = logging.getLogger("ray.serve")


def recorder_specs(cfg: ServingConfig) -> dict[str, EcosystemSpec]:
    """The recorder's view of each served ecosystem, from its manifest and config."""
    specs = {}
    for name, eco in cfg.ecosystems.items():
        manifest = load_manifest(Path(cfg.model_repository) / name)
        current = {m.name: m for m in manifest.current_members()}
        members = list(eco.members or current)
        reference = members.index(eco.policy.primary) if isinstance(eco.policy, PrimaryPolicyConfig) else 0
        specs[name] = EcosystemSpec(
            name=name,
            members=tuple(members),
            classes=manifest.classes,
            subgroups=dict(manifest.subgroups),
            intersections=manifest.intersections,
            compressed=tuple(current[m].compressed for m in members),
            reference=reference,
            label_mode=eco.label_mode,
            assume_label_after_s=eco.assume_label_after_s,
            assumed_label=eco.assumed_label,
        )
    return specs


def feedback_reply(recorder: Recorder, items: list[LabelItem]) -> dict[str, Any]:
    try:
        results = recorder.feedback(items)
    except FeedbackError as exc:
        return {"error": str(exc)}
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    return {
        "accepted": len(results),
        "counts": counts,
        "results": [
            {"request_id": r.request_id, "status": r.status, "unknown_request_id": r.unknown_request_id}
            for r in results
        ],
    }


class LocalTelemetry:
    """The telemetry backend for an in-process recorder (tests, single-process runs)."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    async def feedback(self, items: list[LabelItem]) -> dict[str, Any]:
        reply = await asyncio.to_thread(feedback_reply, self.recorder, items)
        if "error" in reply:
            raise UnprocessableEntity(reply["error"])
        return reply

    async def metrics(self) -> bytes:
        return await asyncio.to_thread(exposition, self.recorder)


class HandleTelemetry:
    """The telemetry backend of a gateway replica: calls the recorder deployment."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def feedback(self, items: list[LabelItem]) -> dict[str, Any]:
        reply: dict[str, Any] = await self.handle.feedback.remote(items)
        if "error" in reply:
            raise UnprocessableEntity(reply["error"])
        return reply

    async def metrics(self) -> bytes:
        data: bytes = await self.handle.metrics.remote()
        return data


class RecorderHost:
    """A recorder with its store and sweep thread: the body of the Recorder deployment, and what a
    gateway runs in-process with `telemetry.recorder_in_gateway`."""

    def __init__(self, specs: dict[str, EcosystemSpec], telemetry: dict[str, Any]) -> None:
        cfg = TelemetryConfig.model_validate(telemetry)
        url = cfg.resolved_store_url()
        self.store: OutcomeStore | StoreProcess = StoreProcess(url, nice=cfg.store_process_nice) if cfg.store_process else open_store(url)
        self.recorder = Recorder(
            specs,
            self.store,
            pending_ttl_s=cfg.pending_ttl_s,
            max_pending=cfg.max_pending,
            window_s=cfg.window_s,
            window_buckets=cfg.window_buckets,
            coverage_ages_s=cfg.coverage_ages_s,
        )
        log.info("recorder ready on %s store; %d outcomes stored", self.store.backend, self.store.count_outcomes())
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_loop, args=(cfg.sweep_interval_s,), daemon=True)
        self._sweeper.start()

    def _sweep_loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.recorder.sweep()
            except Exception as exc:  # the sweep retries next period; never kill the thread
                log.warning("recorder sweep failed: %s", exc)

    def record(self, outcomes: list[Outcome], reporter: str, report: dict[str, Any]) -> dict[str, Any]:
        stats: dict[str, Any] = self.recorder.record(outcomes, reporter, report)
        stats["rewards"] = {eco: self.recorder.reward_stats(eco) for eco in self.recorder.specs}
        return stats

    def feedback(self, items: list[LabelItem]) -> dict[str, Any]:
        return feedback_reply(self.recorder, items)

    def reclaim(self, ledger: str, accepted: dict[str, int]) -> dict[str, int]:
        return self.recorder.reclaim(ledger, accepted)

    def metrics(self) -> bytes:
        return exposition(self.recorder)

    def sweep(self) -> dict[str, int]:
        return self.recorder.sweep()

    def close(self) -> None:
        self._stop.set()
        self.store.close()

    def __del__(self) -> None:
        self.close()


RecorderDeployment = serve.deployment(
    name="Recorder", health_check_period_s=2, health_check_timeout_s=10,
    graceful_shutdown_timeout_s=5, graceful_shutdown_wait_loop_s=0.5,
)(RecorderHost)
