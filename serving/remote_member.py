"""A member served elsewhere: an Open Inference Protocol v2 endpoint (Triton, KServe, Seldon, a
vendor's API behind an OIP front), called by the gateway like any other member.

One pooled async HTTP client per member, at most `max_concurrency` calls in flight, each bounded
by `timeout_s`. The answer's `output` (class ids, class names, or values for regression) and,
when configured, its `probability_output` are mapped to what the ecosystem records. A timeout is
raised as `TimeoutError` (the ensemble counts it as `kind="timeout"`); a connection error, an
HTTP error status or an answer that does not fit (missing output, wrong length, unknown class) as
`RemoteMemberError`: either way the member's output is missing for that request and the reason is
kept, never a failed request while another member can answer.

No retries: a retried call would double the remote's cost and blur its latency, and the ensemble
already treats the member's silence as a missing output.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import httpx
import numpy as np

from models.manifest import EcosystemManifest, MemberSpec

__all__ = ["HttpMember", "RemoteMemberError", "REMOTE_PROVIDER"]

REMOTE_PROVIDER = "remote"  # the `provider` label of its latency and errors


class RemoteMemberError(RuntimeError):
    """The remote endpoint did not give a usable answer (its message says why)."""


class HttpMember:
    def __init__(self, manifest: EcosystemManifest, spec: MemberSpec) -> None:
        assert spec.remote is not None
        self.spec, self.remote = spec, spec.remote
        self.name, self.version, self.provider = spec.name, spec.version, REMOTE_PROVIDER
        self.manifest = manifest
        self.regression = manifest.regression is not None
        self.classes = {c: i for i, c in enumerate(manifest.classes)}
        version = f"/versions/{self.remote.version}" if self.remote.version else ""
        self.url = f"{self.remote.url}/v2/models/{self.remote.model}{version}/infer"
        token = os.environ.get(self.remote.token_env, "") if self.remote.token_env else ""
        self.headers = {"authorization": f"Bearer {token}"} if token else {}
        self._client: httpx.AsyncClient | None = None
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._datatype = {"float32": "FP32", "float64": "FP64", "int64": "INT64", "int32": "INT32"}[manifest.input.dtype]

    def _pool(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        # made on first use, inside the event loop that will use them (again if the loop changed)
        loop = asyncio.get_running_loop()
        if self._client is None or self._slots is None or self._loop is not loop:
            self._loop = loop
            limits = httpx.Limits(max_connections=self.remote.max_concurrency,
                                  max_keepalive_connections=self.remote.max_concurrency)
            self._client = httpx.AsyncClient(limits=limits, timeout=self.remote.timeout_s, headers=self.headers)
            self._slots = asyncio.Semaphore(self.remote.max_concurrency)
        return self._client, self._slots

    def _body(self, x: np.ndarray) -> tuple[bytes, dict[str, str]]:
        outputs = [self.remote.output] + ([self.remote.probability_output] if self.remote.probability_output else [])
        inp: dict[str, Any] = {"name": self.manifest.input.name, "shape": list(x.shape), "datatype": self._datatype}
        if not self.remote.binary:
            inp["data"] = x.ravel().tolist()
            return json.dumps({"inputs": [inp], "outputs": [{"name": o} for o in outputs]}).encode(), \
                {"content-type": "application/json"}
        raw = np.ascontiguousarray(x).astype(x.dtype.newbyteorder("<")).tobytes()
        inp["parameters"] = {"binary_data_size": len(raw)}
        head = json.dumps({"inputs": [inp], "outputs": [{"name": o, "parameters": {"binary_data": True}}
                                                        for o in outputs]}).encode()
        return head + raw, {"content-type": "application/octet-stream",
                            "inference-header-content-length": str(len(head))}

    async def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        client, slots = self._pool()
        body, headers = self._body(x)
        async with slots:
            try:
                r = await client.post(self.url, content=body, headers=headers)
            except httpx.TimeoutException as exc:
                raise TimeoutError(f"{self.name}: {self.url} gave no answer within {self.remote.timeout_s} s") from exc
            except httpx.HTTPError as exc:
                raise RemoteMemberError(f"{self.name}: {self.url}: {type(exc).__name__}: {exc}") from exc
        if r.status_code != 200:
            raise RemoteMemberError(f"{self.name}: {self.url} answered HTTP {r.status_code}: {r.text[:200]}")
        return self._decode(r, x.shape[0])

    def _decode(self, r: httpx.Response, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        content = r.content
        length = r.headers.get("inference-header-content-length")
        try:
            head = json.loads(content[: int(length)] if length else content)
            outputs = {o["name"]: o for o in head["outputs"]}
        except (ValueError, KeyError, TypeError) as exc:
            raise RemoteMemberError(f"{self.name}: the answer is not an inference response ({exc})") from exc
        tail, offset, arrays = content[int(length):] if length else b"", 0, {}
        for o in head["outputs"]:  # binary outputs follow the JSON in the order of the outputs
            size = (o.get("parameters") or {}).get("binary_data_size")
            if size is not None:
                arrays[o["name"]] = (tail[offset : offset + size], o)
                offset += size
        labels = self._values(outputs, arrays, self.remote.output, n)
        probs = None
        if self.remote.probability_output:
            p = self._values(outputs, arrays, self.remote.probability_output, n * len(self.classes), numeric=True)
            probs = p.astype(np.float32).reshape(n, len(self.classes))
        return labels, probs

    def _values(self, outputs: dict[str, Any], arrays: dict[str, Any], name: str, count: int,
                numeric: bool = False) -> np.ndarray:
        if name not in outputs:
            raise RemoteMemberError(f"{self.name}: the answer has no output {name!r} (has {sorted(outputs)})")
        out = outputs[name]
        if name in arrays:
            raw, meta = arrays[name]
            dtype = {"INT64": "<i8", "INT32": "<i4", "FP32": "<f4", "FP64": "<f8"}.get(meta.get("datatype", ""))
            if dtype is None or len(raw) != count * np.dtype(dtype).itemsize:
                raise RemoteMemberError(f"{self.name}: output {name!r}: binary data does not fit {count} values")
            data: Any = np.frombuffer(raw, dtype=dtype)
        else:
            data = out.get("data")
            if not isinstance(data, list):
                raise RemoteMemberError(f"{self.name}: output {name!r} has no data")
            data = np.asarray(data).reshape(-1)
        if len(data) != count:
            raise RemoteMemberError(f"{self.name}: output {name!r} has {len(data)} values, expected {count}")
        if numeric or self.regression:
            if data.dtype.kind not in "iuf":
                raise RemoteMemberError(f"{self.name}: output {name!r} holds non-numbers")
            return np.asarray(data, dtype=np.float64)
        if data.dtype.kind in "US":  # class names
            try:
                return np.array([self.classes[str(v)] for v in data], dtype=np.int64)
            except KeyError as exc:
                raise RemoteMemberError(f"{self.name}: output {name!r}: {exc.args[0]!r} is not a class") from exc
        if data.dtype.kind not in "iuf" or not all(float(v).is_integer() and 0 <= v < len(self.classes) for v in data):
            raise RemoteMemberError(f"{self.name}: output {name!r}: class ids must be 0..{len(self.classes) - 1}")
        return np.asarray(data, dtype=np.int64)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

