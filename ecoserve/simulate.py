"""`ecoserve simulate`: close the loop of a ranking ecosystem with synthetic users and watch it.

The world is the demo `shop`'s (`models.build.ShopWorld`): 60 items, users with a context and a
segment, preferences known to the simulator. Each round:

1. the members (trained by the simulator, exported to ONNX as a new version) serve the round's
   users through ecoserve's own HTTP app, data plane, ONNX Runtime sessions, recorder and SQLite
   store, in this process (no Ray: every round redeploys the members, and a Ray redeploy per round
   would take longer than the round);
2. each user sees the served list and clicks by a **position-based model** (parameters below); the
   click, or `no_click`, goes back through `POST /v2/feedback`;
3. the round's metrics are computed by ecoserve's own code (`telemetry.ranking`) from what the
   store recorded of the round (coverage, Gini, ARP, APLT of what was shown, each member's
   off-policy SNIPS estimate with its interval; popularity counts every click so far), and each
   member's **true** click-through from the preferences (its own recorded list for each user);
4. the members are retrained on the clicks logged so far (the contexts the simulator sent, joined
   to the labels): what was never shown is never clicked, so without exploration the catalogue
   narrows round after round.

Click model (stated): slot j (1 = top) is examined with probability theta_j = 1 / j; an examined item
i attracts with a(u, i) = sigmoid(utility(u, i) - TAU) / sum_j theta_j, so that at most one item is
clicked: P(click on slot j) = theta_j a(u, item_j), P(no click) = 1 - sum_j theta_j a(u, item_j).
A list's true click-through is the mean of sum_j theta_j a(u, item_j) over the round's users.

Exploration `on` adds a member `explorer` scoring items at random (an ONNX RandomUniformLike) and
routes by epsilon-greedy (`--epsilon`), and shuffles the shown list on `--shuffle` of the rows;
`off` serves the greedy member only (epsilon 0, no shuffle, no explorer).
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SimulationConfig", "RoundResult", "simulate", "THETA_EXPONENT", "TAU", "format_rounds"]

THETA_EXPONENT = 1.0  # theta_j = 1 / j ** THETA_EXPONENT
TAU = 2.0  # attraction threshold on the utility scale
TRAINED = ("logreg", "forest")  # the members the simulator trains (and retrains) each round


@dataclass(frozen=True)
class SimulationConfig:
    rounds: int = 8
    users: int = 400  # per round
    exploration: bool = False
    epsilon: float = 0.2  # exploration on: share of rows served by a uniformly drawn member
    shuffle: float = 0.2  # exploration on: position_shuffle_rate
    seed: int = 0
    history: int = 1500  # users in the historical (unbiased) data the first members train on


@dataclass
class RoundResult:
    round: int
    users: int
    ctr: float  # clicks / users
    coverage: float | None  # share of the catalogue in what was shown this round
    gini: float | None
    arp: float | None
    aplt: float | None
    members: dict[str, dict[str, float | None]] = field(default_factory=dict)  # true, snips, lower, upper


def _theta(k: int) -> np.ndarray:
    return np.asarray(1.0 / np.arange(1, k + 1) ** THETA_EXPONENT)


def _attraction(world: Any, x: np.ndarray, segment: np.ndarray, k: int) -> np.ndarray:
    from models.build import segment_weight

    u = world.utility(x, segment_weight(segment))
    return np.asarray(1.0 / (1.0 + np.exp(-(u - TAU))) / _theta(k).sum())


def _explorer_onnx(path: Path, n_features: int, n_items: int, seed: int) -> None:
    """A member that scores every item uniformly at random: an exploration policy's ONNX."""
    import onnx
    from onnx import TensorProto, helper

    zeros = helper.make_tensor("zeros", TensorProto.FLOAT, [n_features, n_items], [0.0] * (n_features * n_items))
    nodes = [
        helper.make_node("MatMul", ["input", "zeros"], ["blank"]),
        helper.make_node("RandomUniformLike", ["blank"], ["probabilities"], seed=float(seed)),
        helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "explorer", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, n_features])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, n_items])], [zeros])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def _train(name: str, X: np.ndarray, y: np.ndarray, seed: int) -> Any:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if name == "logreg":
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=2000))
    else:
        model = RandomForestClassifier(n_estimators=40, max_depth=10, random_state=seed)
    with warnings.catch_warnings():
        # the first rounds' logs hold few clicks per item: scikit-learn's "looks like regression" and
        # convergence warnings say so, every round, and change nothing
        warnings.simplefilter("ignore", UserWarning)
        return model.fit(X, y)


def _write_repository(repo: Path, models: dict[str, Any], version: str, explorer: bool, n_features: int,
                      seed: int) -> None:
    """The round's ecosystem `sim_shop`: the trained members as ONNX version `version`."""
    import yaml

    from models.build import SHOP_ITEMS, SHOP_K, _export

    eco = repo / "sim_shop"
    members = []
    for name, model in models.items():
        _export(model, n_features, eco / name / version / "model.onnx")
        members.append({"name": name, "version": version, "path": f"{name}/{version}/model.onnx"})
    if explorer:
        _explorer_onnx(eco / "explorer" / version / "model.onnx", n_features, SHOP_ITEMS, seed)
        members.append({"name": "explorer", "version": version, "path": f"explorer/{version}/model.onnx"})
    manifest = {
        "name": "sim_shop", "task": "ranking", "description": "ecoserve simulate's shop",
        "input": {"name": "input", "shape": [-1, n_features], "dtype": "float32"},
        "label_output": "label", "probability_output": "probabilities",
        "classes": [f"item_{i:02d}" for i in range(SHOP_ITEMS)], "ranking": {"k": SHOP_K},
        "members": members, "subgroups": {"segment": ["new", "returning"]},
    }
    (eco / "ecosystem.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))


def _serve_round(repo: Path, db: Path, cfg: SimulationConfig, members: list[str]) -> tuple[Any, Any]:
    """The round's app: ecoserve's HTTP app, data plane and recorder, in this process."""
    from models.runtime import load_member
    from serving.config import parse_serving
    from serving.dataplane import Dataplane
    from serving.http import build_http_app
    from serving.members import LocalMember
    from serving.recording.host import LocalTelemetry, RecorderHost, recorder_specs

    policy: dict[str, Any] = ({"kind": "epsilon_greedy", "epsilon": cfg.epsilon, "seed": cfg.seed} if cfg.exploration
                              else {"kind": "primary", "primary": TRAINED[0]})
    serving = parse_serving({
        "model_repository": str(repo), "provider": "cpu",
        "limits": {"max_rows_per_request": 100_000, "max_body_bytes": 1 << 28},
        "telemetry": {"store_url": f"sqlite:///{db}"},
        "ecosystems": {"sim_shop": {"policy": policy, "members": members,
                                    "position_shuffle_rate": cfg.shuffle if cfg.exploration else 0.0}},
    })
    host = RecorderHost(recorder_specs(serving), serving.telemetry.model_dump(mode="json"))
    def sink(outcomes: list[Any]) -> None:
        host.record(outcomes, "sim", {})

    dataplane = Dataplane.build(serving, lambda d, m, s: LocalMember(load_member(d, m, s, "cpu")), sink=sink)
    return build_http_app(dataplane, LocalTelemetry(host)), host


async def _post(app: Any, path: str, body: Any) -> Any:
    import httpx

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://simulate") as c:
        r = await c.post(path, content=json.dumps(body).encode(), timeout=600)
    if r.status_code != 200:
        raise RuntimeError(f"{path}: {r.status_code} {r.text[:300]}")
    return r.json()


def _metrics(host: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(host.metrics().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _get(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float | None:
    return m.get((name, tuple(sorted({"ecosystem": "sim_shop", **labels}.items()))))


def simulate(cfg: SimulationConfig, work: Path, progress: bool = True) -> list[RoundResult]:
    from models.build import SHOP_ITEMS, SHOP_K, catalogue_prior, segment_weight, shop_world
    from telemetry.ranking import RankingCounts

    world, _ = shop_world()
    rng = np.random.default_rng(cfg.seed)
    shutil.rmtree(work, ignore_errors=True)
    repo = work / "repository"
    k, theta = SHOP_K, _theta(SHOP_K)
    # the history the first members learn from: unbiased engagement (every item had its chance)
    hx, hseg = world.users(rng, cfg.history)
    hy = (world.utility(hx, segment_weight(hseg)) + rng.gumbel(size=(cfg.history, SHOP_ITEMS)) * 1.5).argmax(axis=1)
    train_x, train_y = catalogue_prior(world, hx, hy)
    logged_x: list[np.ndarray] = []
    logged_y: list[np.ndarray] = []
    members = [*TRAINED, *(["explorer"] if cfg.exploration else [])]
    results = []
    clicks_so_far = np.zeros(SHOP_ITEMS, dtype=np.int64)
    for r in range(cfg.rounds):
        models = {name: _train(name, train_x, train_y, cfg.seed + r) for name in TRAINED}
        _write_repository(repo, models, str(r + 1), cfg.exploration, hx.shape[1], cfg.seed + r)
        app, host = _serve_round(repo, work / f"round-{r + 1}.db", cfg, members)
        try:
            x, seg = world.users(rng, cfg.users)
            body = asyncio.run(_post(app, "/v2/models/sim_shop/infer", {
                "id": f"r{r + 1}", "parameters": {"subgroups": [{"segment": str(s)} for s in seg]},
                "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                            "data": x.reshape(-1).tolist()}]}))
            out = next(o for o in body["outputs"] if o["name"] == "ranking")
            shown = np.array(out["data"], dtype=np.int64).reshape(-1, k)
            ids = body["parameters"]["request_ids"]
            attraction = _attraction(world, x, seg, k)
            p_click = theta[None, :] * attraction[np.arange(len(x))[:, None], shown]  # (n, k)
            u = rng.random(len(x))
            cum = np.cumsum(p_click, axis=1)
            slot = (u[:, None] < cum).argmax(axis=1)
            clicked = u < cum[:, -1]
            labels = [{"request_id": rid, "label": f"item_{shown[i, slot[i]]:02d}" if clicked[i] else "no_click"}
                      for i, rid in enumerate(ids)]
            asyncio.run(_post(app, "/v2/feedback", {"labels": labels}))
            stored = host.store.get_outcomes(ids)
            # the round's counts, by ecoserve's own code from what the store recorded; popularity:
            # every click so far (what the members learned from)
            outcomes = [stored[rid] for rid in ids]
            counts = RankingCounts.of_stored(tuple(members), SHOP_ITEMS, k, outcomes,
                                             np.array([o.label for o in outcomes], dtype=np.float64))
            clicks_so_far = clicks_so_far + counts.clicks_item
            shown_stats = counts.catalogue(clicks_so_far)["shown"]
            estimates = counts.estimates()
            if r == 0:  # the first round's store holds the same: the recorder's /metrics agree
                m = _metrics(host)
                assert _get(m, "ecoserve_ranking_coverage_ratio", list="shown") == shown_stats["coverage"]
            result = RoundResult(
                round=r + 1, users=len(x), ctr=float(clicked.mean()), coverage=shown_stats["coverage"],
                gini=shown_stats["gini"], arp=shown_stats["arp"], aplt=shown_stats["aplt"])
            for a, name in enumerate(members):
                lists = np.array([stored[rid].rankings[a] for rid in ids], dtype=np.int64)
                true = float((theta[None, :] * attraction[np.arange(len(x))[:, None], lists]).sum(axis=1).mean())
                result.members[name] = {
                    "true": true,
                    "snips": estimates[name]["snips"],
                    "lower": estimates[name]["snips_lower"],
                    "upper": estimates[name]["snips_upper"],
                    "served_share": float(np.mean([s == name for s in body["parameters"]["served_members"]])),
                }
            results.append(result)
            if progress:
                print(format_rounds([result], header=r == 0), file=sys.stderr, flush=True)
        finally:
            host.close()
        # what was clicked is what the next members learn from (the feedback loop)
        logged_x.append(x[clicked])
        logged_y.append(shown[np.arange(len(x)), slot][clicked])
        train_x, train_y = catalogue_prior(world, np.concatenate(logged_x), np.concatenate(logged_y))
    return results


def _f(v: float | None, pct: bool = True) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v * 100:.1f}%" if pct else f"{v:.3f}"


def format_rounds(results: list[RoundResult], header: bool = True) -> str:
    lines = []
    if header:
        lines.append("round  users   CTR  coverage  Gini    ARP   APLT  | member: true CTR / SNIPS [95% interval]")
    for r in results:
        per = "  ".join(f"{n}: {_f(v['true'])} / {_f(v['snips'])} [{_f(v['lower'])}, {_f(v['upper'])}]"
                        for n, v in r.members.items())
        lines.append(f"{r.round:>5} {r.users:>6} {_f(r.ctr):>6} {_f(r.coverage):>9} {_f(r.gini, False):>5} "
                     f"{_f(r.arp):>6} {_f(r.aplt):>6}  | {per}")
    return "\n".join(lines)


def plot_rounds(runs: dict[str, list[RoundResult]], path: Path) -> Path:
    """Top: coverage, ARP, APLT and click-through per round for each run (e.g. exploration off and
    on). Bottom, per run: each member's true click-through (line) and its SNIPS estimate with the
    95% interval (points with bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from ecoserve.report import PALETTE

    fig = plt.figure(figsize=(14, 7), dpi=100)
    grid = fig.add_gridspec(2, 4)
    top = [fig.add_subplot(grid[0, i]) for i in range(4)]
    for (label, rounds), colour in zip(runs.items(), PALETTE):
        x = [r.round for r in rounds]
        for ax, key, title in zip(top, ("coverage", "arp", "aplt", "ctr"),
                                  ("catalogue coverage of shown lists (%)", "ARP: mean popularity of shown (%)",
                                   "APLT: long-tail share of shown (%)", "click-through (%)")):
            ax.plot(x, [100 * (getattr(r, key) or 0) for r in rounds], marker="o", color=colour, label=label)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("round")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    top[0].legend(frameon=False, fontsize=8)
    width = 4 // max(1, len(runs))
    for j, (label, rounds) in enumerate(runs.items()):
        ax = fig.add_subplot(grid[1, j * width:(j + 1) * width])
        names = list(rounds[0].members) if rounds else []
        for name, colour in zip(names, PALETTE):
            rx = np.array([r.round for r in rounds], dtype=float)
            ax.plot(rx, [100 * (r.members[name]["true"] or 0) for r in rounds], color=colour, label=f"{name}: true")
            est = [(r.round, r.members[name]) for r in rounds if r.members[name]["snips"] is not None]
            if est:
                ex = np.array([e[0] for e in est], dtype=float) + 0.08 * (names.index(name) - 1)
                ev = np.array([100 * (e[1]["snips"] or 0) for e in est])
                lo = np.array([100 * (e[1]["lower"] or 0) for e in est])
                hi = np.array([100 * (e[1]["upper"] or 0) for e in est])
                ax.errorbar(ex, ev, yerr=[ev - lo, hi - ev], fmt="o", color=colour, capsize=2, ms=4,
                            label=f"{name}: SNIPS, 95% interval")
        ax.set_title(f"{label}: each member's click-through, true vs estimated (%)", fontsize=9)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(frameon=False, fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def to_json(runs: dict[str, list[RoundResult]]) -> str:
    return json.dumps({k: [asdict(r) for r in v] for k, v in runs.items()}, indent=1)
