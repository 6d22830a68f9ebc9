"""What sits above the serving and telemetry layers: the `ecoserve` command line, the local
server (`ecoserve serve`), the demo, and the operations artifacts (`ecoserve.ops`: dashboards,
alert rules, Grafana push, Kubernetes generation, a local Prometheus).

`serving` and `telemetry` never import this package. Importing it does not import Ray.
"""

from pathlib import Path

__all__ = ["DEMO_CONFIG"]

# the demo's Serve config file, shipped inside the package (`ecoserve serve` with no argument)
DEMO_CONFIG = Path(__file__).resolve().parent / "demo.yaml"
