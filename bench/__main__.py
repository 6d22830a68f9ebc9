"""`python -m bench [section ...]`: print a table of measured figures and ratios."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Sequence


def _table(title: str, rows: Sequence[tuple[str, ...]], header: tuple[str, ...]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n## {title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


def main(argv: list[str]) -> int:
    if argv[:1] == ["reliability"]:  # its own command: faults and hostile input (docs/reliability.md)
        from bench import reliability

        return reliability.main(argv[1:])
    sections = argv or ["core", "telemetry", "estimation", "outside", "onoff", "risk", "wire", "serving"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    if "core" in sections:
        from bench import core

        _table("metric core", core.run(), ("measure", "ecoserve", "baseline (same run)", "ratio / target"))
    if "telemetry" in sections:
        from bench import telemetry

        _table(
            "label ingest (recorder.feedback, batches of 1,000, 50,000 labels, 6 members, 1 subgroup attribute)",
            telemetry.run(),
            ("store", "labels/s", "floor: bare UPDATEs/s", "ratio", "target"),
        )
    if "estimation" in sections:
        from pathlib import Path

        from bench import estimation

        _table(
            "label-free estimates: what scores, refits, refreshes and per-request risk cost",
            estimation.run(Path(os.environ.get("REPO", "model_repository"))),
            ("measure", "ecoserve", "baseline (same run)", "ratio"),
        )
    if "onoff" in sections:
        from pathlib import Path

        from bench import serving

        _table(
            "telemetry on vs off (the default config; side by side, alternating ABBA rounds; digits, 6 members)",
            serving.onoff(Path(os.environ.get("REPO", "model_repository"))),
            ("rows/req", "concurrency", "on req/s (median)", "off req/s (median)", "on/off (paired median)",
             "paired on/off: IQR (range)",
             "p50 on/off", "server CPU ms/req on / off", "CPU off/on", "recorder process CPU us/req (share)", "stored after load: s (median / max)", "errors",
             "target >= 0.95x: 90% CI of the median"),
        )
    if "risk" in sections:
        from pathlib import Path

        from bench import serving

        _table(
            "per-request risk on vs off (both record and got the same 400 labeled requests; ON's gateway holds the "
            "fitted label-free estimator and answers systemic_failure_risk; ABBA rounds as above)",
            serving.risk(Path(os.environ.get("REPO", "model_repository"))),
            ("rows/req", "concurrency", "risk req/s (median)", "no-risk req/s (median)", "risk/no-risk (paired median)",
             "paired: IQR (range)", "p50 risk/no-risk", "server CPU ms/req risk / no-risk", "CPU no-risk/risk",
             "recorder process CPU us/req (share)", "stored after load: s (median / max)", "errors",
             ">= 0.95x: 90% CI of the median"),
        )
    if "outside" in sections:
        from pathlib import Path

        from bench import outside

        _table(
            "members not hosted here: outcome ingestion, and a remote member's cost",
            outside.run(Path(os.environ.get("REPO", "model_repository"))),
            ("measure", "ecoserve", "baseline (same run)", "ratio", "target"),
        )
    if "wire" in sections:
        from pathlib import Path

        from bench import wire

        print("\nwire formats: the default config, digits (6 members per request), one Python closed-loop client "
              "(httpx / grpc.aio) on the same 2 cores; medians over alternating rounds")
        _table(
            "wire formats (JSON over HTTP, binary tensors over HTTP, gRPC)",
            wire.run(Path(os.environ.get("REPO", "model_repository"))),
            ("format", "rows/req", "concurrency", "req/s", "vs JSON", "p50 ms", "p99 ms", "errors", "targets"),
        )
    if "gpu" in sections:  # not in the default sections: it needs a GPU (or BENCH_GPU_PROVIDER=cpu)
        from pathlib import Path

        from bench import gpu

        _table(
            f"GPU path (digits_gpu: 4 wide MLPs; {gpu.ROWS} rows per request, concurrency {gpu.CONCURRENCY})",
            gpu.run(Path(os.environ.get("REPO", "model_repository"))),
            ("server", "members' provider", "req/s", "vs raw onnxruntime", "target"),
        )
    if "serving" in sections:
        from pathlib import Path

        from bench import serving

        print("\nserving: digits ecosystem, 6 members evaluated per request, closed-loop load (wrk, 1 thread) on the same 2 cores")
        _table(
            "serving (digits, all members per request)",
            serving.run(Path(os.environ.get("REPO", "model_repository"))),
            ("setup", "rows/req", "concurrency", "req/s", "p50 ms", "p99 ms", "errors", "vs baseline"),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
