"""`ecoserve demo`: start the whole system on the demo config, drive it, and say where to look.

1. starts `ecoserve serve` (demo config) as a child process, with a fresh feedback token;
2. replays each ecosystem's held-out split through the endpoint (credit and diabetes with their
   subgroup attributes);
3. posts the true labels in waves a few seconds apart, in shuffled batches with a
   few duplicates; some labels never come: for credit they are assumed after the
   config's `assume_label_after_s`;
4. prints a one-screen summary read back from /metrics, and where to look.

With the demo config it also shows members that are not hosted here: a second, plain Open
Inference Protocol server (`ecoserve.vendor_server`, standing for a vendor's API) serving a kNN
as the remote member `vendor` of `digits_plus` (digits plus that remote member), and
`credit_log`, whose members are all external: the held-out credit predictions are imported as a
prediction log (`ecoserve import-outcomes`) with their labels. Both live in `.demo/`.

It keeps the system running until Ctrl-C (or exits at once with `--exit`).
"""

from __future__ import annotations

import math
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from ecoserve import DEMO_CONFIG
from ecoserve.ops.prometheus_local import prometheus_binary, start_prometheus
from ecoserve.server import wait_ready
from models.heldout import load_heldout
from serving.config import load_serve_file

__all__ = ["run_demo"]

NEVER_LABELED = 0.15  # share of outcomes whose label never arrives


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _replay(url: str, repo: Path, ecosystem: str, rows_per_request: int) -> list[tuple[str, float]]:
    held = load_heldout(repo / ecosystem)
    sent = []
    with httpx.Client(timeout=30) as client:
        for s in range(0, len(held.y), rows_per_request):
            x = held.X[s : s + rows_per_request]
            params: dict[str, Any] = {"request_ids": [f"demo-{ecosystem}-{i}" for i in range(s, s + len(x))]}
            if held.groups:
                params["subgroups"] = [{a: str(v[i]) for a, v in held.groups.items()} for i in range(s, s + len(x))]
            body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                "data": x.ravel().tolist()}], "parameters": params}
            r = client.post(f"{url}/v2/models/{ecosystem}/infer", json=body)
            r.raise_for_status()
            sent += list(zip(params["request_ids"], held.y[s : s + len(x)].tolist()))
    return sent


def _post_labels(url: str, token: str, labels: list[tuple[str, float]], waves: int, rng: random.Random) -> None:
    labels = [lab for lab in labels if rng.random() >= NEVER_LABELED]
    rng.shuffle(labels)
    per_wave = math.ceil(len(labels) / waves)
    with httpx.Client(timeout=60, headers={"authorization": f"Bearer {token}"}) as client:
        for w in range(waves):
            wave = labels[w * per_wave : (w + 1) * per_wave]
            items = [{"request_id": rid, "label": y, "source": "demo"} for rid, y in wave]
            items += items[:5]  # a few duplicates: idempotent
            if items:
                client.post(f"{url}/v2/feedback", json={"labels": items}).raise_for_status()
            time.sleep(2.0)


def _scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def _get(m: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float | None:
    for lab, v in m.get(name, []):
        if all(lab.get(k) == val for k, val in labels.items()):
            return v
    return None


def _fmt(v: float | None, pct: bool = True) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v * 100:.2f}%" if pct else f"{v:.3f}"


def _signed(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:+.1f} points"


def summary(url: str, ecosystems: list[str]) -> str:
    m = _scrape(url)
    lines = []
    for eco in ecosystems:
        allg = {"ecosystem": eco, "subgroup": "all", "subgroup_value": "all"}
        outcomes = _get(m, "ecoserve_outcomes_total", ecosystem=eco)
        obs = _get(m, "ecoserve_labeled_outcomes_total", source="observed", **allg)
        ass = _get(m, "ecoserve_labeled_outcomes_total", source="assumed", **allg)
        lists = [v for lab, v in m.get("ecoserve_ranking_served_labeled_total", []) if lab.get("ecosystem") == eco]
        if lists:  # ranking: the ecosystem counters count clicks; a no-click labels the list only
            shown = sum(v for lab, v in m.get("ecoserve_ranking_served_clicks_total", []) if lab.get("ecosystem") == eco)
            clicks = (obs or 0) + (ass or 0)
            lines.append(f"[{eco}] lists shown {outcomes:.0f}, labeled {sum(lists):.0f}: clicks {clicks:.0f} ({shown:.0f} "
                         f"on a shown item), no click {sum(lists) - clicks:.0f}")
        else:
            lines.append(f"[{eco}] outcomes {outcomes:.0f}, labels observed {obs:.0f}, assumed {ass:.0f}")
        sfr = _get(m, "ecoserve_window_systemic_failure_ratio", **allg)
        base = _get(m, "ecoserve_window_systemic_failure_baseline_ratio", **allg)
        csr = _get(m, "ecoserve_window_consistent_success_ratio", **allg)
        una = _get(m, "ecoserve_window_unanimity_ratio", **allg)
        lines.append(f"  {'systemic miss' if lists else 'systemic failure'} {_fmt(sfr)} vs {_fmt(base)} if members "
                     "failed independently;"
                     f" consistent success {_fmt(csr)}; unanimity (label-free) {_fmt(una)}")
        kappas = [v for lab, v in m.get("ecoserve_window_kappa", []) if lab.get("ecosystem") == eco]
        amb = _get(m, "ecoserve_window_ambiguity_ratio", ecosystem=eco)
        cie = _get(m, "ecoserve_window_cie_ratio", ecosystem=eco)
        line = f"  mean pairwise kappa {np.mean(kappas):.3f}; ambiguity {_fmt(amb)}" if kappas else "  -"
        if cie is not None:
            line += f"; compression-identified exemplars {_fmt(cie)}"
        lines.append(line)
        accs = [(lab["member"], v) for lab, v in m.get("ecoserve_window_member_accuracy_ratio", [])
                if lab.get("ecosystem") == eco]
        lines.append("  accuracy: " + ", ".join(f"{mem} {v * 100:.1f}%" for mem, v in accs))
        groups = [(lab["subgroup"], lab["subgroup_value"], v) for lab, v in
                  m.get("ecoserve_window_systemic_failure_ratio", [])
                  if lab.get("ecosystem") == eco and lab.get("subgroup") != "all"]
        for sg, val, v in groups:
            b = _get(m, "ecoserve_window_systemic_failure_baseline_ratio", ecosystem=eco, subgroup=sg, subgroup_value=val)
            lines.append(f"    {sg}={val}: systemic failure {_fmt(v)} (independent: {_fmt(b)})")
        ips = [(lab["member"], v) for lab, v in m.get("ecoserve_window_snips", []) if lab.get("ecosystem") == eco]
        min_prop = _get(m, "ecoserve_window_min_propensity", ecosystem=eco)
        if ips and min_prop is not None and min_prop < 1:  # off-policy values only where the policy explores
            served = {lab["member"]: v for lab, v in m.get("ecoserve_served_total", []) if lab.get("ecosystem") == eco}
            total = sum(served.values()) or 1
            mp = _get(m, "ecoserve_window_min_propensity", ecosystem=eco)
            lines.append(f"  exploration: min propensity {_fmt(mp, pct=False)}; SNIPS value / served share: "
                         + ", ".join(f"{mem} {v:.3f}/{served.get(mem, 0) / total:.0%}" for mem, v in ips))
        for lab, n in m.get("ecoserve_candidate_labeled_total", []):
            if lab.get("ecosystem") != eco or lab.get("subgroup") != "all":
                continue
            key = {k: lab[k] for k in ("ecosystem", "member", "version", "candidate", "subgroup", "subgroup_value")}
            imp = _get(m, "ecoserve_candidate_improvements_total", **key) or 0
            reg = _get(m, "ecoserve_candidate_regressions_total", **key) or 0
            on_sys = _get(m, "ecoserve_candidate_improvements_on_systemic_failures_total", **key) or 0
            lines.append(f"  candidate {lab['member']} v{lab['candidate']} (in shadow of v{lab['version']}), {n:.0f} "
                         f"labeled: fixes {imp:.0f}, breaks {reg:.0f}; fixes for people every other member fails: "
                         f"{on_sys:.0f}")
        ctr = [(lab["member"], v) for lab, v in m.get("ecoserve_ranking_ctr_ratio", []) if lab.get("ecosystem") == eco]
        if ctr:
            snips = {lab["member"]: v for lab, v in m.get("ecoserve_ranking_snips_ctr_ratio", [])
                     if lab.get("ecosystem") == eco}
            lines.append("  click-through served / estimated for every request (SNIPS): "
                         + ", ".join(f"{mem} {v:.1%} / {_fmt(snips.get(mem))}" for mem, v in ctr))
            cov = _get(m, "ecoserve_ranking_coverage_ratio", ecosystem=eco, list="shown")
            gini = _get(m, "ecoserve_ranking_exposure_gini", ecosystem=eco, list="shown")
            aplt = _get(m, "ecoserve_ranking_long_tail_ratio", ecosystem=eco, list="shown")
            lines.append(f"  shown lists: catalogue coverage {_fmt(cov)}, exposure Gini {_fmt(gini, pct=False)}, "
                         f"long-tail share {_fmt(aplt)}")
        for lab, flag in m.get("ecoserve_pipeline_self_defeating_improvement", []):
            if lab.get("ecosystem") != eco:
                continue
            key = {"ecosystem": eco, "version": lab["version"], "candidate": lab["candidate"], "subgroup": "all",
                   "subgroup_value": "all"}
            alone = _get(m, "ecoserve_candidate_accuracy_delta", member=f"{lab['member']}.{lab['stage']}", **key)
            chain = _get(m, "ecoserve_candidate_accuracy_delta", member=lab["member"], **key)
            lines.append(f"  pipeline {lab['member']} v{lab['candidate']}: its {lab['stage']} stage alone "
                         f"{_signed(alone)}, the whole chain {_signed(chain)} -> "
                         + ("SELF-DEFEATING IMPROVEMENT (better stage, worse pipeline)" if flag == 1 else "not flagged"))
    pending = _get(m, "ecoserve_labels_pending")
    dup = sum(v for _, v in m.get("ecoserve_labels_duplicate_total", []))
    lines.append(f"labels pending {pending:.0f}; duplicates ignored {dup:.0f}")
    return "\n".join(lines)


def _outside_members(file_path: Path, repo: Path, work: Path) -> tuple[Path, subprocess.Popen[bytes], str]:
    """The demo's members hosted elsewhere: start the stand-in vendor server, write `digits_plus`
    (digits plus the remote member `vendor`) and `credit_log` (credit's members, all external)
    into the repository, and a config serving them beside the demo's ecosystems."""
    import shutil

    import yaml

    from ecoserve.vendor_server import start_vendor

    vendor, vendor_url = start_vendor(repo / "digits/knn/1/model.onnx")
    for name, src in (("digits_plus", "digits"), ("credit_log", "credit")):
        shutil.rmtree(repo / name, ignore_errors=True)
        shutil.copytree(repo / src, repo / name)
        m = yaml.safe_load((repo / name / "ecosystem.yaml").read_text())
        m["name"] = name
        if name == "digits_plus":
            m["members"].append({"name": "vendor", "version": "1", "kind": "remote", "remote": {
                "url": vendor_url, "model": "ok", "probability_output": "probabilities", "timeout_s": 1.0}})
        else:
            m["members"] = [{"name": x["name"], "version": x["version"], "kind": "external"} for x in m["members"]]
        (repo / name / "ecosystem.yaml").write_text(yaml.safe_dump(m, sort_keys=False))
    cfg = yaml.safe_load(file_path.read_text())
    ecos = cfg["applications"][0]["args"]["ecosystems"]
    ecos["digits_plus"] = {"policy": {"kind": "primary", "primary": "vendor"}, "shadow_fraction": 1.0}
    ecos["credit_log"] = {}
    out = work / "demo.yaml"
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out, vendor, vendor_url


def _import_log(url: str, token: str, repo: Path, work: Path) -> str:
    import asyncio

    from ecoserve.importer import import_outcomes
    from models.heldout import write_predictions_csv

    table = work / "credit_log.csv"
    write_predictions_csv(repo / "credit", table)

    async def go() -> str:
        async with httpx.AsyncClient(base_url=url) as client:
            r = await import_outcomes(table, "credit_log", None, client, group_columns=("sex", "age_group"),
                                      token=token)
        return f"imported {r.outcomes} logged outcomes of credit_log and {r.labels} labels from {table}"

    return asyncio.run(go())


def _write_report(store_url: str, repo: Path) -> Path | None:
    """`ecoserve report` of what the demo recorded, into .demo/report/ (None, said, if it fails)."""
    from ecoserve.report import ReportError, table_from_store, write_report

    try:
        tables = table_from_store(store_url, None, None, None, repo, progress=False)
        return write_report(tables, Path(".demo/report"), "the demo's outcome store").resolve()
    except ReportError as exc:
        print(f"could not write the report: {exc}")
        return None


def run_demo(exit_after: bool = False, config: str | None = None) -> int:
    cfg_path = Path(config) if config else DEMO_CONFIG
    file = load_serve_file(cfg_path)
    repo = Path(file.serving.model_repository)
    url = f"http://127.0.0.1:{file.http_port}"
    token = os.environ.get("ECOSERVE_FEEDBACK_TOKEN") or secrets.token_urlsafe(16)
    env = {**os.environ, "ECOSERVE_FEEDBACK_TOKEN": token}
    vendor = None
    if config is None:  # the demo config: with members hosted elsewhere
        work = Path(".demo")
        work.mkdir(exist_ok=True)
        cfg_path, vendor, vendor_url = _outside_members(cfg_path, repo, work)
        print(f"a stand-in vendor (a plain Open Inference Protocol server) serves a kNN at {vendor_url}: "
              "the remote member `vendor` of digits_plus")
        file = load_serve_file(cfg_path)
    print(f"starting ecoserve ({cfg_path}) ... (Ray and the models take ~30 s)")
    proc = subprocess.Popen([sys.executable, "-m", "ecoserve.cli", "serve", str(cfg_path)], env=env)
    prom = None
    try:
        wait_ready(url, proc)
        if prometheus_binary() is not None:
            prom = start_prometheus(f"127.0.0.1:{file.http_port}", Path(".demo/prometheus"),
                                    port=9090 if _port_free(9090) else None, scrape_interval_s=5.0)
            print(f"Prometheus {prom.url} scrapes {url}/metrics every 5 s, alert rules loaded")
        else:
            print("Prometheus is not installed (Debian: sudo apt-get install prometheus, or `make tools`): "
                  "the demo runs without it")
        rng = random.Random(0)
        ecos = list(file.serving.ecosystems)
        served = [e for e in ecos if e != "credit_log"]
        sent = {}
        replayed_at = {}
        for eco in served:
            rows = 8 if eco.startswith("digits") or eco == "shop" else 1
            sent[eco] = _replay(url, repo, eco, rows)
            replayed_at[eco] = time.time()
            print(f"replayed {len(sent[eco])} held-out rows of {eco} through {url}/v2/models/{eco}/infer")
        for eco in served:
            _post_labels(url, token, sent[eco], waves=3, rng=rng)
            print(f"posted labels for {eco} in 3 waves ({NEVER_LABELED:.0%} never arrive)")
        if "credit_log" in ecos:
            print(_import_log(url, token, repo, Path(".demo")))
        # until the newest outcome of each ecosystem with a timeout is past it (plus a sweep or two)
        until = max((replayed_at.get(name, time.time()) + e.assume_label_after_s + 6
                     for name, e in file.serving.ecosystems.items() if e.assume_label_after_s), default=0.0)
        if until > time.time():
            timed = [f"{name} ({e.assume_label_after_s:.0f} s)" for name, e in file.serving.ecosystems.items()
                     if e.assume_label_after_s]
            print(f"waiting {until - time.time():.0f} s so unlabeled outcomes get their assumed labels: "
                  + ", ".join(timed) + "...")
            time.sleep(until - time.time())
        print()
        print(summary(url, ecos))
        print()
        report = _write_report(file.serving.telemetry.store_url, repo)
        print(f"where to look:\n  metrics:     {url}/metrics\n  models:      "
              + "  ".join(f"{url}/v2/models/{eco}" for eco in served) + f"\n  feedback:    POST {url}/v2/feedback  (Authorization: Bearer {token})\n"
              f"  outcomes:    {file.serving.telemetry.store_url}")
        if report is not None:
            print(f"  report:      {report}  (plots of every finding; open it in a browser)")
        if prom is not None:
            print(f"  Prometheus:  {prom.url}  (alerts: {prom.url}/alerts)\n"
                  f"  Grafana:     add a Prometheus data source {prom.url} and push the dashboards:\n"
                  f"               ecoserve dashboards push --url http://admin:admin@localhost:3000 --prometheus-url {prom.url}")
        if exit_after:
            return 0
        print("\nthe system keeps running; Ctrl-C to stop")
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        while proc.poll() is None:
            time.sleep(1)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        if prom is not None:
            prom.stop()
        if vendor is not None:
            from ecoserve.vendor_server import stop_vendor

            stop_vendor(vendor)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
