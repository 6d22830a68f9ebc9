"""How the gateway calls a member: in-process ONNX Runtime, batched, or a remote deployment.

`LocalMember` runs an ONNX Runtime session on a thread of its own (ONNX Runtime
releases the GIL, so members run in parallel and a slow member only delays
itself), with optional fault injection. `BatchedLocalMember` adds Ray Serve's
dynamic batching (`@serve.batch`): concurrent calls are concatenated along the
batch axis into one session run and split back. It needs a Serve replica.
`RemoteMember` calls a member deployment through a Serve handle.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

from models.runtime import MemberSession
from serving.config import BatchingConfig, FaultConfig

__all__ = ["MemberCall", "MemberFault", "LocalMember", "BatchedLocalMember", "RemoteMember", "Prediction",
           "stage_info", "split_prediction"]

# class ids (n,), class scores (n, C); a pipeline member adds, per row and stage, what is recorded
# of the stage (n, stages, 3) (`models.runtime.STAGE_FIELDS`)
Prediction = tuple[np.ndarray, np.ndarray | None] | tuple[np.ndarray, np.ndarray | None, np.ndarray]


def stage_info(pred: Prediction) -> np.ndarray | None:
    """A pipeline member's per-stage record (None for any other member)."""
    return pred[2] if len(pred) == 3 else None


def split_prediction(pred: Prediction, sizes: list[int]) -> list[Prediction]:
    """One prediction of joined rows -> one per caller (the batch sizes, in order)."""
    bounds = np.cumsum(sizes)[:-1]
    lab = np.split(pred[0], bounds)
    pr: list[np.ndarray | None] = list(np.split(pred[1], bounds)) if pred[1] is not None else [None] * len(sizes)
    info = stage_info(pred)
    if info is None:
        return list(zip(lab, pr))
    return list(zip(lab, pr, np.split(info, bounds)))


class MemberFault(RuntimeError):
    """Raised by a member with fault injection `error: true`."""


class MemberCall(Protocol):
    name: str
    version: str
    provider: str

    async def predict(self, x: np.ndarray) -> Prediction: ...


class LocalMember:
    """One ONNX Runtime session on its own worker thread."""

    def __init__(self, session: MemberSession, fault: FaultConfig | None = None) -> None:
        self.session = session
        self.name = session.spec.name
        self.version = session.spec.version
        self.provider = session.provider
        self.fault = fault
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"member-{session.key}")

    def _run(self, x: np.ndarray) -> Prediction:
        if self.fault is not None:
            if self.fault.delay_s:
                time.sleep(self.fault.delay_s)
            if self.fault.error:
                raise MemberFault(f"member {self.session.key}: injected fault")
        return self.session.predict(x)

    async def predict(self, x: np.ndarray) -> Prediction:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run, x)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class BatchedLocalMember(LocalMember):
    """A `LocalMember` with Serve's dynamic batching, sized from the config (inside a replica only).

    Each instance gets its own `@serve.batch` function. Serve keeps one batch queue per
    decorated *function* and runs a batch with the first caller's `self`, so decorating a
    method shared by several members in one replica would mix their calls into one batch
    run by one member's session (seen here: `credit.forest` answering with logreg's output).
    """

    def __init__(self, session: MemberSession, batching: BatchingConfig, fault: FaultConfig | None = None) -> None:
        super().__init__(session, fault)
        from ray import serve

        run_one = super().predict

        @serve.batch(max_batch_size=batching.max_batch_size, batch_wait_timeout_s=batching.batch_wait_timeout_s)
        async def run_batch(xs: list[np.ndarray]) -> list[Prediction]:
            sizes = [x.shape[0] for x in xs]
            joined = xs[0] if len(xs) == 1 else np.concatenate(xs, axis=0)
            return split_prediction(await run_one(joined), sizes)

        self._run_batch = run_batch

    async def predict(self, x: np.ndarray) -> Prediction:
        result: Prediction = await self._run_batch(x)
        return result


class RemoteMember:
    """A member deployment reached through a Serve deployment handle."""

    def __init__(self, handle: Any, name: str, version: str, provider: str) -> None:
        self._handle = handle
        self.name, self.version, self.provider = name, version, provider

    async def predict(self, x: np.ndarray) -> Prediction:
        result: Prediction = await self._handle.predict.remote(x)
        return result
