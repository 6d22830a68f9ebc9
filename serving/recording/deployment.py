"""The recorder as a Ray Serve deployment (one replica), and the gateway's view of it.

`RecorderDeployment` wraps `serving.recording.host.RecorderHost`: it owns the store, runs the
assumed-label / pending-expiry sweep on a thread, and answers `record`, `feedback` and
`metrics` calls from the gateways. Errors cross the handle as values (`{"error": ...}`), not
exceptions, so the gateway can map them to 4xx.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from serving.recording.host import RecorderHost, raise_for_reply
from telemetry.recorder import LabelItem

__all__ = ["RecorderDeployment", "HandleTelemetry"]


class HandleTelemetry:
    """The telemetry backend of a gateway replica: calls the recorder deployment."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def feedback(self, items: list[LabelItem], scope: frozenset[str] | None = None) -> dict[str, Any]:
        return raise_for_reply(await self.handle.feedback.remote(items, scope))

    async def outcomes(self, items: list[tuple[Any, ...]]) -> dict[str, Any]:
        return raise_for_reply(await self.handle.outcomes.remote(items))

    async def audit(self, ecosystem: str, kind: str, limit: int) -> dict[str, Any]:
        return raise_for_reply(await self.handle.audit.remote(ecosystem, kind, limit))

    async def metrics(self) -> bytes:
        data: bytes = await self.handle.metrics.remote()
        return data


RecorderDeployment = serve.deployment(
    name="Recorder", health_check_period_s=2, health_check_timeout_s=10,
    graceful_shutdown_timeout_s=5, graceful_shutdown_wait_loop_s=0.5,
)(RecorderHost)
