"""The serving config: key paths and bad values in every error."""

from __future__ import annotations

import pytest
import yaml

from serving.config import DEMO_CONFIG, ConfigError, load_serve_file, parse_serving

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
    assert set(f.serving.ecosystems) == {"digits", "credit", "diabetes"}
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
    proc = subprocess.run([sys.executable, "-m", "serving.cli", "check-config", str(p)], capture_output=True, text=True)
    assert proc.returncode == 2 and "applications.0.args.provider" in proc.stderr and "'tpu'" in proc.stderr
