"""Operations artifacts generated from code: Grafana dashboards (`dashboards`), Prometheus alert
rules (`alerts`), the Grafana push client (`grafana_push`), the Kubernetes manifests' generated
parts (`k8s`), and a local Prometheus for the demo and the tests (`prometheus_local`).

Every generator writes where its caller says (the CLI passes the repository root); nothing is
written next to this package's own files.
"""
