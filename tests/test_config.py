"""The serving config: key paths and bad values in every error."""

from __future__ import annotations

import pytest
import yaml

from ecoserve import DEMO_CONFIG
from serving.config import ConfigError, load_serve_file, parse_serving

BASE = {
    "model_repository": "model_repository",
    "ecosystems": {"digits": {"policy": {"kind": "primary", "primary": "mlp_a"}}},
}


def _with(path, value):
    import copy

    cfg = copy.deepcopy(BASE)
    node = cfg
    for k in path[:-1]:
        node = node.setdefault(k, {})
    node[path[-1]] = value
    return cfg


@pytest.mark.parametrize(
    "path, value, message",
    [
        (["colour"], "red", "args.colour: Extra inputs are not permitted (got 'red')"),
        (["provider"], "tpu", "args.provider: Input should be 'auto', 'cuda' or 'cpu' (got 'tpu')"),
        (["batching", "max_batch_size"], 0, "args.batching.max_batch_size: Input should be greater than or equal to 1 (got 0)"),
        (["members", "num_gpus"], -0.5, "args.members.num_gpus: Input should be greater than or equal to 0 (got -0.5)"),
        (["ecosystems", "digits", "shadow_fraction"], 1.5, "args.ecosystems.digits.shadow_fraction"),
        (["ecosystems", "digits", "policy"], {"kind": "random"}, "args.ecosystems.digits.policy"),
        (["ecosystems", "digits", "policy"], {"kind": "epsilon_greedy", "epsilon": 2}, "args.ecosystems.digits.policy.epsilon_greedy.epsilon"),
        (["limits", "max_body_bytes"], "big", "args.limits.max_body_bytes"),
    ],
)
def test_bad_values_name_the_key_path_and_value(path, value, message):
    with pytest.raises(ConfigError) as err:
        parse_serving(_with(path, value))
    assert message in str(err.value)


def test_demo_config_is_valid():
    f = load_serve_file(DEMO_CONFIG)
    assert set(f.serving.ecosystems) == {"digits", "credit", "diabetes", "digits_chain", "shop"}
    assert f.http_port == 8000


def test_serve_file_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("applications: []\n")
    with pytest.raises(ConfigError, match="non-empty 'applications'"):
        load_serve_file(p)
    p.write_text(yaml.safe_dump({"applications": [{"name": "x", "import_path": "other:app"}]}))
    with pytest.raises(ConfigError, match="no application with import_path"):
        load_serve_file(p)
    p.write_text(yaml.safe_dump({"applications": [{"import_path": "serving.app:build_app", "args": {"x": 1}}]}))
    with pytest.raises(ConfigError, match="applications.0.args"):
        load_serve_file(p)
    with pytest.raises(ConfigError, match="no such config file"):
        load_serve_file(tmp_path / "missing.yaml")


def test_check_config_cli(tmp_path):
    import subprocess
    import sys

    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"applications": [{"import_path": "serving.app:build_app", "args": _with(["provider"], "tpu")}]}))
    proc = subprocess.run([sys.executable, "-m", "ecoserve.cli", "check-config", str(p)], capture_output=True, text=True)
    assert proc.returncode == 2 and "applications.0.args.provider" in proc.stderr and "'tpu'" in proc.stderr


def _serve_file(tmp_path, args, port=None):
    from conftest import write_serve_file

    from ecoserve.server import free_port

    return load_serve_file(write_serve_file(tmp_path / "serve.yaml", port or free_port(), args))


@pytest.mark.parametrize("change, env, message", [
    (lambda a: a.update(auth={"feedback_token_env": "ECO_TEST_TOKEN"}), {},
     "auth.feedback_token_env: environment variable 'ECO_TEST_TOKEN' is empty or unset"),
    (lambda a: a.update(telemetry={"store_url_env": "ECO_TEST_STORE"}), {},
     "telemetry.store_url_env: environment variable 'ECO_TEST_STORE' is empty or unset"),
    (lambda a: a.update(telemetry={"store_url_env": "ECO_TEST_STORE"}), {"ECO_TEST_STORE": "mysql://x/y"},
     "telemetry.store_url_env: expected sqlite:///PATH or postgresql://..., got a URL starting 'mysql'"),
    (lambda a: a.update(model_repository="/nonexistent/repo"), {}, "model_repository: no such folder '/nonexistent/repo'"),
    (lambda a: a["ecosystems"].update(nope={"policy": {"kind": "primary", "primary": "a"}, "members": ["a"]}), {},
     "ecosystems.nope: "),
    (lambda a: a["ecosystems"]["digits"].update(members=["mlp_a", "ghost"]), {},
     "ecosystems.digits.members: 'ghost' is not a member"),
])
def test_preflight_names_the_setting_that_cannot_work(serving_repo, tmp_path, monkeypatch, change, env, message):
    from serving.config import preflight

    args = {"model_repository": str(serving_repo), "telemetry": {"store_url": f"sqlite:///{tmp_path}/o.db"},
            "ecosystems": {"digits": {"policy": {"kind": "primary", "primary": "mlp_a"}}}}
    change(args)
    for k in ("ECO_TEST_TOKEN", "ECO_TEST_STORE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError) as err:
        preflight(_serve_file(tmp_path, args))
    assert message in str(err.value)
    assert len(str(err.value).splitlines()) == 1


def test_preflight_finds_a_missing_model_file_and_a_busy_port(serving_repo, tmp_path):
    import shutil
    import socket

    from serving.config import preflight

    repo = tmp_path / "repo"
    shutil.copytree(serving_repo / "digits", repo / "digits")
    args = {"model_repository": str(repo), "telemetry": {"store_url": f"sqlite:///{tmp_path}/o.db"},
            "ecosystems": {"digits": {"policy": {"kind": "primary", "primary": "mlp_a"}}}}
    preflight(_serve_file(tmp_path, args))  # all there
    next(repo.glob("digits/knn/*/model.onnx")).unlink()
    with pytest.raises(ConfigError, match="ecosystems.digits: member 'knn': no model file"):
        preflight(_serve_file(tmp_path, args))
    args["ecosystems"]["digits"]["members"] = ["mlp_a", "logreg"]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"http_options.port: port {port} on 127.0.0.1 is already in use"):
            preflight(_serve_file(tmp_path, args, port))
        preflight(_serve_file(tmp_path, args, port), check_port=False)


def test_gateway_autoscaling():
    auto = {"min_replicas": 1, "max_replicas": 3}
    cfg = parse_serving(_with(["gateway"], {"autoscaling": auto}))
    assert cfg.gateway.max_replicas == 3
    assert not cfg.recorder_in_gateway()  # several gateways: the recorder is its own deployment
    with pytest.raises(ConfigError, match="max_replicas \\(1\\) is below min_replicas \\(2\\)"):
        parse_serving(_with(["gateway"], {"autoscaling": {"min_replicas": 2, "max_replicas": 1}}))
    bad = _with(["gateway"], {"autoscaling": auto})
    bad["telemetry"] = {"recorder_in_gateway": True}
    with pytest.raises(ConfigError, match="recorder_in_gateway needs one gateway replica"):
        parse_serving(bad)
    assert parse_serving(BASE).recorder_in_gateway()


def test_an_address_where_no_cluster_answers_fails_fast(serving_repo, tmp_path):
    import subprocess
    import sys
    import time

    from conftest import write_serve_file

    from ecoserve.server import free_port

    path = write_serve_file(tmp_path / "s.yaml", free_port(), {
        "model_repository": str(serving_repo), "ecosystems": {"digits": {"policy": {"kind": "primary", "primary": "mlp_a"}}}})
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "ecoserve.cli", "serve", str(path), "--address", f"127.0.0.1:{free_port()}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no Ray cluster answers there" in proc.stderr, proc.stderr
    assert time.monotonic() - t0 < 5
