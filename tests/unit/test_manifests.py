"""The deployment manifests keep medserve's posture: offline, non-root, nothing open.

Checked on the files as committed (always) and, where a kustomize renderer is installed
(``.venv-deploy/bin/kubectl`` from scripts/check-manifests.sh, or ``kubectl`` on PATH),
on what ``kubectl kustomize`` renders for the base and each overlay, patches applied.

- Every medserve and vLLM container sets every variable of ``medserve.privacy.OFFLINE_ENV``
  to its value, runs non-root on a read-only root filesystem, without privilege
  escalation, with every capability dropped and the RuntimeDefault seccomp profile.
- Services are ClusterIP and expose only port 8000 of medserve and vLLM.
- NetworkPolicies: a default deny; no rule open to every peer, no 0.0.0.0/0 or ::/0.
- Secrets: none committed inline; no password in an environment value or URL.
- Compose: nothing published beyond loopback by default (medserve: MEDSERVE_PUBLISH), the
  other services on internal networks only, secrets from files.
- The model registries in the ConfigMaps load with medserve's own registry loader.
- No medserve container widens its egress guard (``MEDSERVE_EGRESS_ALLOW``): medserve
  allows the hosts of its database URLs and vLLM replicas by itself, and the
  NetworkPolicies are written for exactly those; every variable is named (no ``envFrom``),
  so these checks see them all.

Each check is a function returning its problems; the table of broken copies at the end
shows that each one reports what it should.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from medserve.engines.vllm import VllmSpec
from medserve.privacy import OFFLINE_ENV
from medserve.registry import load_registry
from tests.conftest import ROOT

K8S = ROOT / "deploy" / "kubernetes"
COMPOSE = ROOT / "deploy" / "compose.yaml"
OVERLAYS = ("base", "overlays/cpu", "overlays/gpu")
# What kustomize's secretGenerator reads (base/secrets/, git-ignored): placeholders here.
SECRET_FILES = (
    "audit.key",
    "audit-signing.key",
    "audit-signing.pub",
    "db-gateway-password",
    "db-owner-password",
    "db-ca.crt",
)
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
# Containers whose posture is checked: medserve's image and vLLM's.
CHECKED_IMAGE = re.compile(r"(^|/)(medserve|vllm[\w.-]*)(:|@|$)")
# The containers each source must hold (so that no check passes on nothing).
EXPECTED_CONTAINERS = {
    "files": {"medserve", "keys", "audit", "vllm"},
    "base": {"medserve", "keys", "audit"},
    "overlays/cpu": {"medserve", "keys", "audit"},
    "overlays/gpu": {"medserve", "keys", "audit", "vllm"},
}
# Service name -> the ports it may expose.
SERVICE_PORTS = {"medserve": {8000}, "vllm": {8000}, "vllm-0": {8000}, "vllm-1": {8000}}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|(^|_)KEY$|API_KEY", re.IGNORECASE)
PASSWORD_IN_URL = re.compile(r"://[^/@:\s]+:[^/@\s]+@")
OPEN_CIDRS = {"0.0.0.0/0", "::/0"}
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
WIDENED = "MEDSERVE_EGRESS_ALLOW widens the egress guard beyond the database and replicas"

Doc = dict[str, Any]


# ---- loading ---------------------------------------------------------------------------


def yaml_docs(path: Path) -> list[Doc]:
    with path.open(encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if isinstance(d, dict)]


def patch_files() -> set[Path]:
    """Files that kustomizations use as patches (partial objects, not checked alone)."""
    patches = set()
    for kustomization in K8S.rglob("kustomization.yaml"):
        for entry in yaml_docs(kustomization)[0].get("patches") or []:
            if isinstance(entry, dict) and "path" in entry:
                patches.add((kustomization.parent / entry["path"]).resolve())
    return patches


def committed_docs() -> list[Doc]:
    """Every object in deploy/kubernetes as committed, kustomizations and patches aside."""
    skip = patch_files()
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name != "kustomization.yaml" and path.resolve() not in skip:
            docs.extend(yaml_docs(path))
    return docs


def renderer() -> str | None:
    local = ROOT / ".venv-deploy" / "bin" / "kubectl"
    return str(local) if local.exists() else shutil.which("kubectl")


def render(overlay: str, workdir: Path) -> list[Doc]:
    """``kubectl kustomize`` of a copy of deploy/kubernetes with placeholder secrets."""
    kubectl = renderer()
    if kubectl is None:
        pytest.skip("no kustomize renderer (scripts/check-manifests.sh installs one)")
    tree = workdir / "kubernetes"
    if not tree.exists():
        shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns(*SECRET_FILES))
        for name in SECRET_FILES:
            (tree / "base" / "secrets" / name).write_text("placeholder\n")
    out = subprocess.run(
        [kubectl, "kustomize", str(tree / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if isinstance(d, dict)]


@pytest.fixture(scope="module", params=["files", *OVERLAYS])
def source(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(name, objects): the committed files, or one rendered kustomization."""
    name: str = request.param
    if name == "files":
        return name, committed_docs()
    return name, render(name, tmp_path_factory.mktemp("render"))


# ---- the checks ------------------------------------------------------------------------


def pod_spec(doc: Doc) -> Doc | None:
    if doc.get("kind") not in WORKLOADS:
        return None
    spec: Doc = doc["spec"]["template"]["spec"]
    return spec


def containers(doc: Doc) -> Iterator[tuple[Doc, Doc]]:
    """(pod spec, container) of each checked container of a workload."""
    spec = pod_spec(doc)
    if spec is None:
        return
    for c in [*(spec.get("initContainers") or []), *spec["containers"]]:
        if CHECKED_IMAGE.search(str(c.get("image", ""))):
            yield spec, c


def container_problems(pod: Doc, c: Doc) -> list[str]:
    """What a medserve or vLLM container lacks of the offline and hardened posture."""
    name = c["name"]
    problems = []
    env = {e["name"]: e.get("value") for e in c.get("env") or []}
    for key, value in OFFLINE_ENV.items():
        if env.get(key) != value:
            problems.append(f"{name}: {key} is {env.get(key)!r}, not {value!r}")
    psc, sc = pod.get("securityContext") or {}, c.get("securityContext") or {}

    def setting(key: str) -> Any:
        return sc.get(key, psc.get(key))

    if setting("runAsNonRoot") is not True:
        problems.append(f"{name}: runAsNonRoot is not true")
    if setting("runAsUser") in (None, 0):
        problems.append(f"{name}: runAsUser is not a numeric non-root uid")
    if sc.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{name}: readOnlyRootFilesystem is not true")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{name}: allowPrivilegeEscalation is not false")
    if sc.get("privileged"):
        problems.append(f"{name}: privileged")
    if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
        problems.append(f"{name}: capabilities do not drop ALL")
    if (sc.get("capabilities") or {}).get("add"):
        problems.append(f"{name}: capabilities added")
    if (setting("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problems.append(f"{name}: seccompProfile is not RuntimeDefault")
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(host):
            problems.append(f"{name}: pod sets {host}")
    if c.get("envFrom"):
        problems.append(f"{name}: envFrom (variables these checks cannot see)")
    if "MEDSERVE_EGRESS_ALLOW" in env:
        problems.append(f"{name}: {WIDENED}")
    return problems


def env_problems(doc: Doc) -> list[str]:
    """Secrets written into a workload's environment instead of referenced."""
    spec = pod_spec(doc)
    problems = []
    for c in [] if spec is None else [*(spec.get("initContainers") or []), *spec["containers"]]:
        for e in c.get("env") or []:
            value = e.get("value")
            if value is None:
                continue
            if SECRET_NAME.search(e["name"]) and not e["name"].endswith("_FILE"):
                problems.append(f"{c['name']}: {e['name']} has an inline value")
            if PASSWORD_IN_URL.search(str(value)):
                problems.append(f"{c['name']}: {e['name']} holds a URL with a password")
    return problems


def service_problems(doc: Doc) -> list[str]:
    if doc.get("kind") != "Service":
        return []
    name, spec = doc["metadata"]["name"], doc["spec"]
    problems = []
    if spec.get("type", "ClusterIP") != "ClusterIP":
        problems.append(f"service {name}: type {spec['type']}")
    if spec.get("externalIPs"):
        problems.append(f"service {name}: externalIPs")
    ports = {p["port"] for p in spec.get("ports") or []}
    if name not in SERVICE_PORTS:
        problems.append(f"service {name}: not an expected service")
    elif ports != SERVICE_PORTS[name]:
        problems.append(f"service {name}: ports {sorted(ports)}")
    if any("nodePort" in p for p in spec.get("ports") or []):
        problems.append(f"service {name}: nodePort")
    return problems


def policy_problems(doc: Doc) -> list[str]:
    """A rule without peers admits every address; an ipBlock of 0.0.0.0/0 too."""
    if doc.get("kind") != "NetworkPolicy":
        return []
    name, spec = doc["metadata"]["name"], doc["spec"]
    problems = []
    for direction, peers in (("ingress", "from"), ("egress", "to")):
        for rule in spec.get(direction) or []:
            if not rule.get(peers):
                problems.append(f"policy {name}: an {direction} rule open to all peers")
            for peer in rule.get(peers) or []:
                cidr = (peer.get("ipBlock") or {}).get("cidr")
                if cidr in OPEN_CIDRS:
                    problems.append(f"policy {name}: {direction} to {cidr}")
    return problems


def default_deny(docs: list[Doc]) -> bool:
    return any(
        d.get("kind") == "NetworkPolicy"
        and d["spec"].get("podSelector") == {}
        and set(d["spec"].get("policyTypes") or []) == {"Ingress", "Egress"}
        and not d["spec"].get("ingress")
        and not d["spec"].get("egress")
        for d in docs
    )


def secret_problems(doc: Doc, rendered: bool) -> list[str]:
    """Committed files hold no Secret; a rendering holds only the generated ones."""
    if doc.get("kind") != "Secret":
        if doc.get("kind") == "ConfigMap":
            data = doc.get("data") or {}
            bad = [k for k, v in data.items() if PASSWORD_IN_URL.search(str(v))]
            return [f"configmap {doc['metadata']['name']}: password in {k}" for k in bad]
        return []
    if not rendered:
        return [f"secret {doc['metadata']['name']} committed inline"]
    return []


def all_problems(docs: list[Doc], rendered: bool) -> list[str]:
    problems = []
    for doc in docs:
        for pod, c in containers(doc):
            problems += container_problems(pod, c)
        problems += env_problems(doc) + service_problems(doc) + policy_problems(doc)
        problems += secret_problems(doc, rendered)
    if not default_deny(docs):
        problems.append("no default-deny NetworkPolicy")
    return problems


# ---- compose ---------------------------------------------------------------------------


INTERPOLATED = re.compile(r"\$\{\w+(?::?-([^}]*))?\}")


def published(entry: Any) -> tuple[str, str]:
    """(host address, container port) of one compose `ports` entry, with every variable
    at its default (``${MEDSERVE_PUBLISH:-127.0.0.1}``: what an unconfigured stack does; a
    variable without a default is empty, i.e. every address)."""
    if isinstance(entry, dict):
        return str(entry.get("host_ip", "0.0.0.0")), str(entry["target"])
    text = INTERPOLATED.sub(lambda m: m.group(1) or "", str(entry))
    parts = text.split("/")[0].rsplit(":", 2)
    host = parts[0] if len(parts) == 3 and parts[0] else "0.0.0.0"
    return host.strip("[]"), parts[-1]


def compose_problems(stack: Doc) -> list[str]:
    problems = []
    networks = stack.get("networks") or {}
    internal = {n for n, spec in networks.items() if (spec or {}).get("internal") is True}
    if not internal:
        problems.append("no internal network")
    for name, svc in stack["services"].items():
        for entry in svc.get("ports") or []:
            host, port = published(entry)
            if name == "medserve" and port != "8000":
                problems.append(f"medserve publishes container port {port}")
            elif name != "medserve" and host not in LOOPBACK:
                problems.append(f"{name} publishes {port} on {host}")
            # medserve's port too stays on loopback by default: plain HTTP on every
            # interface only when the operator asks (MEDSERVE_PUBLISH, with TLS on).
            if name == "medserve" and host not in LOOPBACK:
                problems.append(f"medserve publishes {port} on {host} by default")
        nets = set(svc.get("networks") or ["default"])
        if not svc.get("ports") and not nets <= internal:
            problems.append(f"{name} is on a network with a host side: {sorted(nets - internal)}")
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(str(e).split("=", 1) for e in env)
        for key, value in env.items():
            if SECRET_NAME.search(key) and not key.endswith("_FILE"):
                problems.append(f"{name}: {key} set inline")
            if PASSWORD_IN_URL.search(str(value)):
                problems.append(f"{name}: {key} holds a URL with a password")
        if str(svc.get("image", "")).find("medserve") >= 0:
            if "MEDSERVE_EGRESS_ALLOW" in env:
                problems.append(f"{name}: {WIDENED}")
            for key, value in OFFLINE_ENV.items():
                if str(env.get(key)) != value:
                    problems.append(f"{name}: {key} is {env.get(key)!r}, not {value!r}")
            if svc.get("read_only") is not True:
                problems.append(f"{name}: read_only is not true")
            if "ALL" not in (svc.get("cap_drop") or []):
                problems.append(f"{name}: cap_drop lacks ALL")
            if "no-new-privileges:true" not in (svc.get("security_opt") or []):
                problems.append(f"{name}: no no-new-privileges")
        if svc.get("restart", "no") != "no" and "healthcheck" not in svc:
            problems.append(f"{name}: long-running without a healthcheck")
    for secret, spec in (stack.get("secrets") or {}).items():
        if set(spec) != {"file"} or not str(spec["file"]).startswith("./secrets/"):
            problems.append(f"secret {secret}: not a file under ./secrets/")
    return problems


# ---- the tests -------------------------------------------------------------------------


def test_kubernetes_objects_keep_the_posture(source: tuple[str, list[Doc]]) -> None:
    name, docs = source
    assert all_problems(docs, rendered=name != "files") == []


def test_every_expected_container_was_checked(source: tuple[str, list[Doc]]) -> None:
    name, docs = source
    seen = {c["name"] for d in docs for _, c in containers(d)}
    assert seen == EXPECTED_CONTAINERS[name]


def test_vllm_servers_get_a_gpu_and_keep_prompts_out_of_their_log(
    source: tuple[str, list[Doc]],
) -> None:
    _, docs = source
    for doc in docs:
        for _, c in containers(doc):
            if c["name"] == "vllm":
                resources = c["resources"]
                assert (
                    resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
                )
                assert "--no-enable-log-requests" in c["args"]


def test_gpu_registry_points_at_the_rendered_vllm_services(tmp_path: Path) -> None:
    docs = render("overlays/gpu", tmp_path)
    services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
    (registry,) = [
        d for d in docs if d["kind"] == "ConfigMap" and "med-gpu.toml" in (d.get("data") or {})
    ]
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "med-gpu.toml").write_text(registry["data"]["med-gpu.toml"])
    (spec,) = load_registry(tmp_path / "models")
    urls = [r.url for r in spec.replicas if isinstance(r, VllmSpec)]
    hosts = {re.sub(r"^https?://([^:/]+).*$", r"\1", str(url)) for url in urls}
    assert len(urls) == len(spec.replicas) == 2
    assert hosts == {"vllm-0", "vllm-1"} and hosts <= services


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateway_startup_probe_outlasts_its_replicas_start(
    overlay: str, tmp_path: Path
) -> None:
    """medserve answers nothing, not /health, until every replica started or its
    start_timeout_s passed: a shorter startup window kills the gateways on a cold start."""
    docs = render(overlay, tmp_path)
    (registry,) = [
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("medserve-models")
    ]
    (tmp_path / "models").mkdir()
    for name, text in registry["data"].items():
        (tmp_path / "models" / name).write_text(text)
    waits = [
        float(getattr(r, "start_timeout_s", 0))
        for spec in load_registry(tmp_path / "models")
        for r in [*spec.replicas, *spec.fallback]
    ]
    probe = _container(docs, "medserve")["startupProbe"]
    window = (
        probe.get("initialDelaySeconds", 0) + probe["periodSeconds"] * probe["failureThreshold"]
    )
    assert window >= max(waits, default=0) + 60, (overlay, window, waits)


@pytest.mark.parametrize(
    "toml", sorted(K8S.rglob("models/*.toml")), ids=lambda p: str(p.relative_to(K8S))
)
def test_registry_files_load(toml: Path, tmp_path: Path) -> None:
    shutil.copy(toml, tmp_path / toml.name)
    (spec,) = load_registry(tmp_path)
    assert spec.id == toml.stem


def test_compose_publishes_only_medserve() -> None:
    stack = yaml_docs(COMPOSE)[0]
    assert compose_problems(stack) == []
    assert {"medserve", "postgres", "prometheus", "grafana"} <= set(stack["services"])


# ---- each check can fail: broken copies and what must be reported ----------------------


def _container(docs: list[Doc], name: str) -> Doc:
    return next(c for d in docs for _, c in containers(d) if c["name"] == name)


def _doc(docs: list[Doc], kind: str, name: str) -> Doc:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def _drop_env(name: str, key: str) -> Callable[[list[Doc]], None]:
    def mutate(docs: list[Doc]) -> None:
        c = _container(docs, name)
        c["env"] = [e for e in c["env"] if e["name"] != key]

    return mutate


def _set_sc(name: str, key: str, value: Any) -> Callable[[list[Doc]], None]:
    def mutate(docs: list[Doc]) -> None:
        _container(docs, name)["securityContext"][key] = value

    return mutate


def _egress(rule: Doc) -> Callable[[list[Doc]], None]:
    def mutate(docs: list[Doc]) -> None:
        _doc(docs, "NetworkPolicy", "medserve-egress")["spec"]["egress"].append(rule)

    return mutate


def _add(doc: Doc) -> Callable[[list[Doc]], None]:
    return lambda docs: docs.append(doc)


def _service(key: str, value: Any) -> Callable[[list[Doc]], None]:
    def mutate(docs: list[Doc]) -> None:
        _doc(docs, "Service", "medserve")["spec"][key] = value

    return mutate


def _inline_password(docs: list[Doc]) -> None:
    c = _container(docs, "medserve")
    c["env"] = [e for e in c["env"] if e["name"] != "PGPASSWORD"]
    c["env"].append({"name": "PGPASSWORD", "value": "hunter2"})


def _widen_guard(docs: list[Doc]) -> None:
    _container(docs, "medserve")["env"].append(
        {"name": "MEDSERVE_EGRESS_ALLOW", "value": '["medserve-db-rw.database.svc"]'}
    )


def _env_from(docs: list[Doc]) -> None:
    _container(docs, "keys")["envFrom"] = [{"configMapRef": {"name": "medserve-database"}}]


def _drop_default_deny(docs: list[Doc]) -> None:
    docs.remove(_doc(docs, "NetworkPolicy", "default-deny-all"))


BROKEN_K8S = [
    ("offline variable missing", _drop_env("medserve", "HF_HUB_OFFLINE"), "HF_HUB_OFFLINE"),
    ("vLLM offline variable missing", _drop_env("vllm", "VLLM_NO_USAGE_STATS"), "VLLM_NO_"),
    ("writable root fs", _set_sc("medserve", "readOnlyRootFilesystem", False), "readOnlyRoot"),
    ("escalation", _set_sc("keys", "allowPrivilegeEscalation", True), "allowPrivilegeEsc"),
    ("capabilities kept", _set_sc("vllm", "capabilities", {"drop": []}), "drop ALL"),
    ("root", _set_sc("audit", "runAsNonRoot", False), "runAsNonRoot"),
    ("seccomp off", _set_sc("medserve", "seccompProfile", {"type": "Unconfined"}), "seccomp"),
    ("egress anywhere", _egress({"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}), "0.0.0.0/0"),
    ("egress rule without peers", _egress({"ports": [{"port": 443}]}), "open to all peers"),
    ("no default deny", _drop_default_deny, "default-deny"),
    ("NodePort", _service("type", "NodePort"), "type NodePort"),
    ("extra port", _service("ports", [{"port": 8000}, {"port": 9090}]), "ports [8000, 9090]"),
    ("inline Secret", _add({"kind": "Secret", "metadata": {"name": "x"}}), "committed inline"),
    ("inline password", _inline_password, "PGPASSWORD has an inline value"),
    ("egress guard widened", _widen_guard, "medserve: MEDSERVE_EGRESS_ALLOW widens"),
    ("variables from envFrom", _env_from, "keys: envFrom"),
]


@pytest.mark.parametrize(("case", "mutate", "expected"), BROKEN_K8S, ids=[c[0] for c in BROKEN_K8S])
def test_broken_kubernetes_objects_are_reported(
    case: str, mutate: Callable[[list[Doc]], None], expected: str
) -> None:
    docs = copy.deepcopy(committed_docs())
    assert all_problems(docs, rendered=False) == []
    mutate(docs)
    assert any(expected in p for p in all_problems(docs, rendered=False)), case


def _svc(name: str, **fields: Any) -> Callable[[Doc], None]:
    return lambda stack: stack["services"][name].update(fields)


def _drop_offline(stack: Doc) -> None:
    del stack["services"]["medserve"]["environment"]["DO_NOT_TRACK"]


BROKEN_COMPOSE = [
    ("database published", _svc("postgres", ports=["5432:5432"]), "postgres publishes 5432"),
    ("grafana on every address", _svc("grafana", ports=["3000:3000"]), "on 0.0.0.0"),
    ("prometheus on a host network", _svc("prometheus", networks=["edge"]), "host side"),
    ("another medserve port", _svc("medserve", ports=["8000:8000", "9000:9000"]), "port 9000"),
    ("medserve on every address", _svc("medserve", ports=["8000:8000"]), "on 0.0.0.0 by"),
    (
        "medserve widened by default",
        _svc("medserve", ports=["${MEDSERVE_PUBLISH:-0.0.0.0}:8000:8000"]),
        "on 0.0.0.0 by default",
    ),
    ("medserve on an unset variable", _svc("medserve", ports=["${HOST}:8000:8000"]), "0.0.0.0"),
    ("offline variable missing", _drop_offline, "DO_NOT_TRACK"),
    ("writable root fs", _svc("medserve", read_only=False), "read_only"),
    ("inline password", _svc("postgres", environment={"POSTGRES_PASSWORD": "x"}), "inline"),
    (
        "password in a URL",
        _svc("medserve-migrate", environment={"U": "postgresql://o:pw@postgres/medserve"}),
        "URL with a password",
    ),
    ("no healthcheck", lambda s: s["services"]["prometheus"].pop("healthcheck"), "healthcheck"),
    (
        "egress guard widened",
        lambda s: s["services"]["medserve"]["environment"].update(
            {"MEDSERVE_EGRESS_ALLOW": '["postgres"]'}
        ),
        "medserve: MEDSERVE_EGRESS_ALLOW widens",
    ),
    (
        "secret from the environment",
        lambda s: s["secrets"].update({"x": {"environment": "X"}}),
        "secret x",
    ),
]


@pytest.mark.parametrize(
    ("case", "mutate", "expected"), BROKEN_COMPOSE, ids=[c[0] for c in BROKEN_COMPOSE]
)
def test_broken_compose_is_reported(
    case: str, mutate: Callable[[Doc], None], expected: str
) -> None:
    stack = copy.deepcopy(yaml_docs(COMPOSE)[0])
    mutate(stack)
    assert any(expected in p for p in compose_problems(stack)), case
