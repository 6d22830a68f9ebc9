"""The `ecoserve` command: one entry point, one subcommand per task.

Every subcommand imports what it needs when it runs (no work at import time), and
turns expected errors into one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]

DEFAULT_REPOSITORY = "model_repository"


class CliError(Exception):
    """An expected failure: printed as one line, exit status 2."""


def _cmd_build_models(args: argparse.Namespace) -> int:
    warnings.filterwarnings("ignore")  # sklearn convergence and quantizer advice are not the user's concern
    logging.getLogger().setLevel(logging.ERROR)
    from models.build import build_models

    try:
        results = build_models(args.repository, args.ecosystem or None, force=args.force)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    for r in results:
        state = f"built in {r.seconds:.1f} s" if r.built else "up to date"
        accs = ", ".join(f"{m} {a:.3f}" for m, a in r.accuracies.items())
        print(f"{r.ecosystem}: {state} -> {Path(args.repository) / r.ecosystem}  (held-out accuracy: {accs})")
    return 0


def _cmd_predictions(args: argparse.Namespace) -> int:
    from models.heldout import write_predictions_csv
    from models.manifest import ManifestError

    try:
        n = write_predictions_csv(Path(args.repository) / args.ecosystem, args.out, args.provider)
    except (ManifestError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from exc
    print(f"wrote {n} rows of held-out predictions to {args.out}")
    return 0


def _value_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH (two numbers), got {text!r}") from None
    return lo, hi


def _versions(text: str) -> tuple[str, str, str]:
    member, eq, cols = text.partition("=")
    parts = cols.split(",")
    if not eq or not member or len(parts) != 2 or not all(parts):
        raise argparse.ArgumentTypeError(f"expected MEMBER=OLD_COLUMN,NEW_COLUMN, got {text!r}")
    return member, parts[0], parts[1]


def _analysis_options(args: argparse.Namespace) -> Any:
    from telemetry.analysis import AnalysisOptions

    return AnalysisOptions(
        label_column=args.label_column,
        group_columns=tuple(args.group_column or ()),
        members=tuple(m for part in (args.members or ()) for m in part.split(",") if m),
        mode=args.mode,
        served_column=args.served_column,
        propensity_column=args.propensity_column,
        reward_column=args.reward_column,
        reference=args.reference,
        compressed=tuple(m for part in (args.compressed or ()) for m in part.split(",") if m),
        epsilon=args.epsilon,
        tolerance=args.tolerance,
        value_range=args.range,
        bin_width=args.bin_width,
        reference_data=args.reference_data,
        versions=tuple(args.versions or ()),
    )


def _cmd_analyze(args: argparse.Namespace) -> int:
    from telemetry.analysis import AnalysisError, analyze_csv, format_table

    opts = _analysis_options(args)
    try:
        result = analyze_csv(args.file, opts)
    except AnalysisError as exc:
        raise CliError(str(exc)) from exc
    print(json.dumps(result, indent=None if args.compact else 2) if args.json else format_table(result))
    return 0


def _cmd_rollout(args: argparse.Namespace) -> int:
    from ecoserve.rollout import RolloutError, rollout, wait_for_version
    from serving.config import ConfigError

    try:
        previous, new = rollout(args.config, args.action, args.ecosystem, args.member,
                                args.version if args.action == "promote" else args.to, shadow_previous=not args.no_shadow)
    except (RolloutError, ConfigError) as exc:
        raise CliError(str(exc)) from exc
    shadow = "" if args.no_shadow else f"; version {previous} stays in shadow as the candidate"
    print(f"{args.config}: {args.ecosystem}.{args.member} now serves version {new} (was {previous}){shadow}")
    if args.k8s:
        from ecoserve.ops.k8s import K8S_DIR, generate_k8s

        for p in generate_k8s(Path(args.root) / K8S_DIR):
            print(f"wrote {p}")
        print("apply it (kubectl apply -k ...): KubeRay updates the running RayService's serveConfigV2 in place")
    if args.url:
        try:
            took = wait_for_version(args.url.rstrip("/"), args.ecosystem, args.member, new, args.timeout)
        except RolloutError as exc:
            raise CliError(str(exc)) from exc
        print(f"{args.url}: serving version {new} ({took:.0f} s after the config changed)")
    return 0


def _cmd_providers(args: argparse.Namespace) -> int:
    import onnxruntime as ort

    from models.runtime import cuda_device_count, resolve_providers

    print(f"onnxruntime {ort.__version__}: built with {', '.join(ort.get_available_providers())}")
    print(f"CUDA devices visible: {cuda_device_count()}")
    print(f"provider 'auto' resolves to: {resolve_providers('auto')[0]}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from ecoserve.server import serve_foreground
    from serving.config import ConfigError

    try:
        return serve_foreground(args.config, address=args.address)
    except ConfigError as exc:
        raise CliError(str(exc)) from exc


def _cmd_demo(args: argparse.Namespace) -> int:
    from ecoserve.demo import run_demo
    from serving.config import ConfigError

    try:
        return run_demo(exit_after=args.exit, config=args.config)
    except ConfigError as exc:
        raise CliError(str(exc)) from exc


def _cmd_dashboards(args: argparse.Namespace) -> int:
    from ecoserve.ops.dashboards import DASHBOARDS_DIR, build_dashboards, write_dashboards

    if args.action == "generate":
        for p in write_dashboards(args.out or DASHBOARDS_DIR):
            print(f"wrote {p}")
        return 0
    from ecoserve.ops.grafana_push import PushError, push_dashboards

    if not args.url or not (args.token or "@" in args.url):
        raise CliError("push needs --url and --token (a Grafana service account token with the Editor role), "
                       "or user:password in the URL")
    try:
        for line in push_dashboards(args.url, args.token, build_dashboards(), folder_uid=args.folder_uid,
                                    prometheus_url=args.prometheus_url):
            print(line)
    except PushError as exc:
        raise CliError(str(exc)) from exc
    return 0


def _cmd_alerts(args: argparse.Namespace) -> int:
    from ecoserve.ops.alerts import RULES_FILE, write_rules

    print(f"wrote {write_rules(args.out or RULES_FILE)}")
    return 0


def _cmd_k8s(args: argparse.Namespace) -> int:
    from ecoserve.ops.alerts import RULES_FILE, write_rules
    from ecoserve.ops.dashboards import DASHBOARDS_DIR, write_dashboards
    from ecoserve.ops.k8s import K8S_DIR, generate_k8s
    from serving.config import ConfigError

    root = Path(args.root)
    if not (root / K8S_DIR / "ecoserve.yaml").is_file():
        raise CliError(f"no {K8S_DIR / 'ecoserve.yaml'} under {root.resolve()}: run this in the repository root "
                       "or pass --root")
    try:
        paths = generate_k8s(root / K8S_DIR) + write_dashboards(root / DASHBOARDS_DIR) + [write_rules(root / RULES_FILE)]
    except ConfigError as exc:
        raise CliError(str(exc)) from exc
    for p in paths:
        print(f"wrote {p}")
    return 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    from serving.config import ConfigError, load_serve_file, preflight

    try:
        f = load_serve_file(args.config)
        if not args.syntax_only:
            preflight(f, check_port=not args.skip_port)
    except ConfigError as exc:
        raise CliError(str(exc)) from exc
    print(f"{args.config}: ok ({', '.join(f.serving.ecosystems)})")
    return 0


def _cmd_import_outcomes(args: argparse.Namespace) -> int:
    import asyncio
    import os

    import httpx

    from ecoserve.importer import ImportError_, ImportResult, import_outcomes

    token = os.environ.get(args.token_env) if args.token_env else None
    members = [m for part in (args.members or ()) for m in part.split(",") if m] or None

    async def go() -> ImportResult:
        async with httpx.AsyncClient(base_url=args.url) as client:
            return await import_outcomes(args.file, args.ecosystem, members, client, id_column=args.id_column,
                                         label_column=args.label_column, group_columns=tuple(args.group_column or ()),
                                         token=token)

    try:
        result = asyncio.run(go())
    except ImportError_ as exc:
        raise CliError(str(exc)) from exc
    print(f"{args.file}: {result.outcomes} outcomes ({result.recorded} recorded, {result.unchanged} stored "
          f"already) and {result.labels} labels posted to {args.url}")
    print(f"metrics: {args.url}/metrics  (ecosystem=\"{args.ecosystem}\")")
    return 0


def _cmd_migrate_store(args: argparse.Namespace) -> int:
    import os

    from telemetry.store import StoreError, open_store

    url = os.environ.get(args.url_env, "") if args.url_env else args.url
    if not url:
        raise CliError(f"environment variable {args.url_env} is not set" if args.url_env else "give a store URL or --url-env")
    try:
        store = open_store(url)  # opening migrates, in one transaction
    except StoreError as exc:  # the driver's first line says what went wrong; the rest is a link
        raise CliError(str(exc).splitlines()[0]) from exc
    try:
        with store.engine.connect() as conn:
            version = conn.exec_driver_sql("SELECT max(version) FROM ecoserve_schema").scalar()
        print(f"outcome store ({store.backend}): schema version {version}, {store.count_outcomes()} outcomes")
    finally:
        store.close()
    return 0


def _add_analysis_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--label-column", default="label", help="default: %(default)s")
    p.add_argument("--group-column", action="append", help="subgroup column (repeatable)")
    p.add_argument("--members", action="append", help="member columns, comma-separated (default: all others)")
    p.add_argument("--mode", choices=["ground_truth", "bandit"], default="ground_truth")
    p.add_argument("--served-column", help="column naming the served member (bandit logs)")
    p.add_argument("--propensity-column", help="column with the served member's logged propensity")
    p.add_argument("--reward-column", help="column with the reward of the served output (bandit mode)")
    p.add_argument("--reference", help="reference member for ambiguity/discrepancy (default: first member)")
    p.add_argument("--compressed", action="append", help="compressed member columns, comma-separated (for CIE)")
    p.add_argument("--epsilon", type=float, default=0.05, help="Rashomon-set accuracy tolerance (default: 0.05)")
    p.add_argument("--tolerance", type=float, help="a regression table: correct = |value - label| <= this")
    p.add_argument("--range", type=_value_range, help="regression: LOW,HIGH covered by the agreement bins")
    p.add_argument("--bin-width", type=float, help="regression: agreement bin width (default: the tolerance)")
    p.add_argument("--reference-data", metavar="LABELED.csv",
                   help="a labeled table with the same members and <member>__score columns: estimate the systemic "
                        "failure rate and each member's accuracy on this table's rows without a label")
    p.add_argument("--versions", action="append", type=_versions, metavar="MEMBER=OLD_COLUMN,NEW_COLUMN",
                   help="two columns are the current and a new version of one member: OLD_COLUMN is the member in "
                        "the ecosystem, NEW_COLUMN enters only the flip table (repeatable)")


def _cmd_report(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from ecoserve.report import (
        ReportError,
        check_output,
        parse_time,
        report_from_csv,
        table_from_store,
        write_report,
    )

    url = os.environ.get(args.store_env, "") if args.store_env else args.store
    if bool(url) == bool(args.csv):
        raise CliError("give one of --store URL (or --store-env VAR) and --csv FILE"
                       + (f" (environment variable {args.store_env} is not set)" if args.store_env and not url else ""))
    out = Path(args.out)
    try:
        check_output(out)  # before a long read
        if args.csv:
            index = report_from_csv(Path(args.csv), _analysis_options(args), out)
        else:
            since = parse_time(args.since) if args.since else None
            until = parse_time(args.until) if args.until else None
            repo = Path(args.repository) if args.repository else None
            tables = table_from_store(url, args.ecosystem, since, until, repo, progress=not args.quiet)
            index = write_report(tables, out, f"store {_redact(url)}")
    except ReportError as exc:
        raise CliError(str(exc).splitlines()[0]) from exc
    print(f"report: {index.resolve()}")
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ecoserve.simulate import SimulationConfig, format_rounds, plot_rounds, simulate, to_json

    if args.rounds < 1 or args.users < 10:
        raise CliError("--rounds must be at least 1 and --users at least 10")
    if not (0 < args.epsilon <= 1 and 0 <= args.shuffle <= 1):
        raise CliError("--epsilon must be in (0, 1] and --shuffle in [0, 1]")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot use {out} as the work folder: {exc.strerror or exc}") from exc
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.exploration]
    runs = {}
    for exploration in modes:
        label = f"exploration {'on' if exploration else 'off'}"
        print(f"{label}: {args.rounds} rounds of {args.users} users", flush=True)
        cfg = SimulationConfig(rounds=args.rounds, users=args.users, exploration=exploration, epsilon=args.epsilon,
                               shuffle=args.shuffle, seed=args.seed)
        runs[label] = simulate(cfg, out / label.replace(" ", "-"), progress=False)
        print(format_rounds(runs[label]), flush=True)
    (out / "rounds.json").write_text(to_json(runs))
    print(f"plot: {plot_rounds(runs, out / 'rounds.png').resolve()}\nper round, as JSON: {(out / 'rounds.json').resolve()}")
    return 0


def _redact(url: str) -> str:
    """A store URL without its password (the page is for sharing)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an odd URL: show its scheme only
        return url.split(":", 1)[0] + ":..."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ecoserve",
        description="Serve an ecosystem of ONNX models behind one endpoint and watch it as an ecosystem.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("build-models", help="train and export the demo ecosystems into a model repository")
    p.add_argument("--repository", default=DEFAULT_REPOSITORY, help="model repository folder (default: %(default)s)")
    p.add_argument("--ecosystem", action="append", help="build only this ecosystem (repeatable)")
    p.add_argument("--force", action="store_true", help="rebuild even when up to date")
    p.set_defaults(func=_cmd_build_models)

    p = sub.add_parser("predictions", help="write a held-out predictions CSV for an ecosystem (input of analyze)")
    p.add_argument("ecosystem")
    p.add_argument("--repository", default=DEFAULT_REPOSITORY)
    p.add_argument("--out", required=True, help="CSV file to write")
    p.add_argument("--provider", choices=["auto", "cuda", "cpu"], default="cpu")
    p.set_defaults(func=_cmd_predictions)

    p = sub.add_parser("analyze", help="ecosystem metrics of a per-instance predictions table (CSV)")
    p.add_argument("file", help="CSV: one row per instance, a label column, one column per member")
    _add_analysis_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--compact", action="store_true", help="with --json: on one line")
    p.set_defaults(func=_cmd_analyze)

    p = sub.add_parser("report", help="write one self-contained HTML page of an ecosystem's findings, with plots "
                       "(from the outcome store, or a prediction table)")
    p.add_argument("--store", help="outcome store URL (sqlite:///PATH or postgresql+psycopg://...)")
    p.add_argument("--store-env", metavar="VAR", help="read the store URL from this environment variable")
    p.add_argument("--ecosystem", action="append", help="only this ecosystem (repeatable; default: every one)")
    p.add_argument("--since", help="outcomes predicted at or after this time (unix seconds or ISO 8601)")
    p.add_argument("--until", help="outcomes predicted before this time (unix seconds or ISO 8601)")
    p.add_argument("--repository", default=DEFAULT_REPOSITORY,
                   help="model repository: class names, compressed members, regression tolerance (default: "
                        "%(default)s; ecosystems not in it are reported by class id)")
    p.add_argument("--out", required=True, help="folder to write index.html (and one CSV per ecosystem) into")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--csv", metavar="FILE", help="a prediction table instead of a store (the analyze options below)")
    _add_analysis_args(p)
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("simulate", help="close the loop of a ranking ecosystem with synthetic users (known "
                       "preferences, a position-based click model) and members retrained on their own clicks; print "
                       "and plot coverage, popularity, click-through and true vs estimated value per round")
    p.add_argument("--rounds", type=int, default=8, help="rounds (default: %(default)s)")
    p.add_argument("--users", type=int, default=1000, help="users per round (default: %(default)s)")
    p.add_argument("--exploration", choices=["off", "on", "both"], default="both",
                   help="off: the greedy member serves everything; on: an explorer member, epsilon-greedy routing "
                        "and position shuffling (default: %(default)s)")
    p.add_argument("--epsilon", type=float, default=0.2, help="exploration on: epsilon (default: %(default)s)")
    p.add_argument("--shuffle", type=float, default=0.2, help="exploration on: position_shuffle_rate (default: "
                   "%(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=".simulate", help="work folder: the rounds' models, stores, plot and JSON "
                   "(default: %(default)s)")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("rollout", help="promote or roll back a member's version: rewrite the config; a server "
                       "started with `ecoserve serve CONFIG` redeploys (docs/serving.md)")
    rs = p.add_subparsers(dest="action", required=True)
    for action in ("promote", "rollback"):
        q = rs.add_parser(action, help="serve VERSION" if action == "promote" else "serve the version in shadow again")
        q.add_argument("ecosystem")
        q.add_argument("member")
        if action == "promote":
            q.add_argument("version")
        else:
            q.add_argument("--to", help="the version to serve (default: the one in shadow)")
        q.add_argument("--config", required=True, help="the Serve config file the server runs (rewritten in place)")
        q.add_argument("--no-shadow", action="store_true",
                       help="do not keep the version served until now in shadow as the candidate")
        q.add_argument("--url", help="wait until the server at this URL serves the new version")
        q.add_argument("--timeout", type=float, default=120.0, help="seconds to wait with --url (default: 120)")
        q.add_argument("--k8s", action="store_true", help="then regenerate k8s/ (ecoserve k8s generate) for kubectl apply")
        q.add_argument("--root", default=".", help="with --k8s: the repository root holding k8s/")
        q.set_defaults(func=_cmd_rollout)

    p = sub.add_parser("serve", help="serve a config (default: the demo config) on Ray Serve, in the foreground")
    p.add_argument("config", nargs="?", help="Serve config file (default: the demo config, port 8000)")
    p.add_argument("--address", help="attach to this running Ray cluster (e.g. 10.0.0.5:6380; default: $RAY_ADDRESS, "
                   "else start a local Ray)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("demo", help="serve the demo, replay held-out data, post labels, print the live metrics")
    p.add_argument("--config", help="Serve config file (default: the demo config)")
    p.add_argument("--exit", action="store_true", help="stop after printing the summary")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("dashboards", help="generate the Grafana dashboards, or push them to Grafana")
    p.add_argument("action", choices=["generate", "push"])
    p.add_argument("--out", help="generate: output folder (default: k8s/base/dashboards, under the working directory)")
    p.add_argument("--url", help="push: Grafana URL, e.g. http://localhost:3000")
    p.add_argument("--token", help="push: Grafana service account token")
    p.add_argument("--folder-uid", help="push: folder to put the dashboards in")
    p.add_argument("--prometheus-url", help="push: also create/update a Prometheus data source with this URL")
    p.set_defaults(func=_cmd_dashboards)

    p = sub.add_parser("alerts", help="generate the Prometheus alert rules file")
    p.add_argument("action", choices=["generate"])
    p.add_argument("--out", help="output file (default: k8s/base/prometheus/ecoserve-rules.yaml, under the working directory)")
    p.set_defaults(func=_cmd_alerts)

    p = sub.add_parser("k8s", help="regenerate the generated parts of k8s/ (RayService, patches, rules, dashboards)")
    p.add_argument("action", choices=["generate"])
    p.add_argument("--root", default=".", help="the repository root holding k8s/ (default: the working directory)")
    p.set_defaults(func=_cmd_k8s)

    p = sub.add_parser("check-config", help="validate a Serve config file, and what serving it needs from here "
                       "(environment variables, store URL, model repository, port)")
    p.add_argument("config")
    p.add_argument("--syntax-only", action="store_true",
                   help="check the file alone, not this machine's environment (e.g. in CI, for a cluster's config)")
    p.add_argument("--skip-port", action="store_true", help="do not check that the HTTP port is free")
    p.set_defaults(func=_cmd_check_config)

    p = sub.add_parser("migrate-store", help="bring an outcome store to this version's schema now (what the first start would do)")
    p.add_argument("url", nargs="?", help="sqlite:///PATH or postgresql://... (or use --url-env)")
    p.add_argument("--url-env", help="read the URL from this environment variable (e.g. a Kubernetes Secret)")
    p.set_defaults(func=_cmd_migrate_store)

    p = sub.add_parser("import-outcomes", help="post a prediction log (the table analyze reads) and its labels "
                       "to a running server: POST /v2/outcomes, then /v2/feedback")
    p.add_argument("file", help="CSV: a request id column, a label column, one column per external member")
    p.add_argument("--ecosystem", required=True)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
    p.add_argument("--token-env", default="ECOSERVE_FEEDBACK_TOKEN",
                   help="environment variable holding the bearer token (default: %(default)s)")
    p.add_argument("--id-column", default="request_id", help="default: %(default)s (absent: FILE-STEM-ROW ids)")
    p.add_argument("--label-column", default="label", help="default: %(default)s")
    p.add_argument("--group-column", action="append", help="subgroup column (repeatable)")
    p.add_argument("--members", action="append", help="member columns, comma-separated (default: all others)")
    p.set_defaults(func=_cmd_import_outcomes)

    p = sub.add_parser("providers", help="report which ONNX Runtime execution provider 'auto' picks here")
    p.set_defaults(func=_cmd_providers)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except CliError as exc:
        print(f"ecoserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
