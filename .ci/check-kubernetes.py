#!/usr/bin/env python3
"""Checks that deploy/kubernetes/ says what the code and the guides say.

    python3 .ci/check-kubernetes.py        # (PyYAML; .ci/check-kubernetes runs it)

kubernetes-validate checks each manifest against the API's schemas; this
checks what a schema cannot know:

  - the generated files equal their sources (the ConfigMap's settings.json and
    topology.toml, the PrometheusRule's groups and prometheus/alerts.yml);
  - every manifest of a folder is listed in its kustomization.yaml, and every
    listed file exists;
  - the worker's probes ask the paths src/http.rs serves (/healthz, /readyz)
    on the port of METRICS_ADDR;
  - terminationGracePeriodSeconds covers the shutdown budget:
    SHUTDOWN_GRACE_MS + 7 s of bounded closes (docs/operations.md, "Shutdown");
  - the memory request covers the peak RSS measured in docs/benchmarks.md, and
    the limit that plus prefetch × MAX_MESSAGE_BYTES of bodies in flight;
  - every pod runs as the image's non-root user, with a read-only root
    filesystem, no privilege escalation, every capability dropped and no
    service account token;
  - the connection budget: (replicas + surge) × (min(prefetch + 2,
    DATABASE_MAX_CONNECTIONS) + 1) fits PostgreSQL's default 100 connections
    less 3 reserved, and so does KEDA's maximum;
  - Services are ClusterIP, select the pods they mean, and the metrics Service
    is named as the alert rules' job; every secretKeyRef names a key of
    secret.example.yaml; every environment variable is a documented setting;
    the image names a registry and its tag is the crate's version, in the
    manifests and in the `images:` of every kustomization that runs it;
    every kustomization sets the same namespace; KEDA scales the queue of
    the settings.

One line per problem, exit status 1; or a summary line and 0.
"""

import json
import pathlib
import re
import subprocess
import sys
import tomllib

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"

# SIGTERM to exit, beyond SHUTDOWN_GRACE_MS: 1 s for the crash counts of
# cut-off work, consumer, channel, connection and pool closes of at most 1 s
# each, 2 s for the outbox relay (docs/operations.md, "Shutdown").
SHUTDOWN_FIXED_SECONDS = 7
# PostgreSQL's default max_connections less superuser_reserved_connections.
DATABASE_CONNECTIONS = 100 - 3
IMAGE_UID = 10001  # Dockerfile: useradd --uid 10001
# Settings of the console (SPEC section 12), not in docs/configuration.md yet.
CONSOLE_KEYS = {"CONSOLE_ADDR", "CONSOLE_TOKEN", "CONSOLE_VIEWER_TOKEN", "JAEGER_UI_URL"}

problems = []


def problem(where, what):
    problems.append(f"{where}: {what}")


def load_all(path):
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def manifests():
    """(path, document) of every manifest; kustomization files excluded."""
    for path in sorted(KUBE.rglob("*.yaml")):
        if path.name != "kustomization.yaml":
            for doc in load_all(path):
                yield path, doc


def rel(path):
    return path.relative_to(ROOT)


def by_kind(docs, kind):
    return [(path, doc) for path, doc in docs if doc.get("kind") == kind]


def mib(quantity):
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi)", str(quantity))
    if not match:
        return None
    return float(match.group(1)) * units[match.group(2)]


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


def setting(container, settings, key, default):
    """A setting as the container sees it: its env value, else the settings file, else the default."""
    entry = env_of(container).get(key)
    if entry and "value" in entry:
        return entry["value"]
    return settings.get(key, default)


def check_generated(docs):
    result = subprocess.run([sys.executable, str(KUBE / "generate"), "--check"], capture_output=True, text=True)
    if result.returncode != 0:
        problem("deploy/kubernetes/generate --check", result.stderr.strip() or "failed")
    # And the same by meaning, whatever the formatting.
    for path, doc in by_kind(docs, "PrometheusRule"):
        alerts = yaml.safe_load((ROOT / "prometheus" / "alerts.yml").read_text(encoding="utf-8"))
        if doc.get("spec", {}).get("groups") != alerts["groups"]:
            problem(rel(path), "its groups differ from prometheus/alerts.yml")
    for path, doc in by_kind(docs, "ConfigMap"):
        data = doc.get("data", {})
        for key, source in (("settings.json", "_storage/settings.json"), ("topology.toml", "topology/topology.toml")):
            if data.get(key) != (ROOT / source).read_text(encoding="utf-8"):
                problem(rel(path), f"{key} differs from {source}")


def check_kustomization_targets(version):
    """One namespace everywhere; each kustomization whose Deployments run
    the image sets it (`images:`) to that image at the crate's version."""
    namespaces = {}
    for kustomization in sorted(KUBE.rglob("kustomization.yaml")):
        spec = yaml.safe_load(kustomization.read_text(encoding="utf-8"))
        namespaces[rel(kustomization)] = spec.get("namespace")
        images = {i["name"]: i for i in spec.get("images", [])}
        for name in spec.get("resources", []):
            for doc in load_all(kustomization.parent / name):
                if not doc or doc.get("kind") != "Deployment":
                    continue
                for c in doc["spec"]["template"]["spec"]["containers"]:
                    image = images.get(c["image"].rpartition(":")[0])
                    if image is None or str(image.get("newTag")) != version:
                        problem(rel(kustomization), f"sets no images: entry for {c['image']} with newTag {version}")
    if None in namespaces.values() or len(set(namespaces.values())) != 1:
        problem("deploy/kubernetes", f"every kustomization sets one and the same namespace: {namespaces}")


def check_kustomizations():
    folders = {path.parent for path in KUBE.rglob("*.yaml")}
    for folder in sorted(folders):
        kustomization = folder / "kustomization.yaml"
        present = {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}
        present = {name for name in present if not name.endswith(".example.yaml")}
        if not kustomization.exists():
            problem(rel(folder), "manifests without a kustomization.yaml")
            continue
        listed = yaml.safe_load(kustomization.read_text(encoding="utf-8")).get("resources", [])
        for name in listed:
            if not (folder / name).exists():
                problem(rel(kustomization), f"lists {name}, which does not exist")
        for name in sorted(present - set(listed)):
            problem(rel(kustomization), f"does not list {name}")


def check_pod_security(path, deployment):
    pod = deployment["spec"]["template"]["spec"]
    where = f"{rel(path)}: {deployment['metadata']['name']}"
    context = pod.get("securityContext", {})
    if context.get("runAsNonRoot") is not True or context.get("runAsUser") != IMAGE_UID:
        problem(where, f"the pod must set runAsNonRoot: true and runAsUser: {IMAGE_UID} (the image's user)")
    if pod.get("automountServiceAccountToken") is not False:
        problem(where, "automountServiceAccountToken must be false: nothing here talks to the Kubernetes API")
    for container in pod["containers"]:
        sc = container.get("securityContext", {})
        name = f"{where}, container {container['name']}"
        if sc.get("readOnlyRootFilesystem") is not True:
            problem(name, "readOnlyRootFilesystem must be true")
        if sc.get("allowPrivilegeEscalation") is not False:
            problem(name, "allowPrivilegeEscalation must be false")
        if sc.get("capabilities", {}).get("drop") != ["ALL"]:
            problem(name, "capabilities must drop ALL")
        if sc.get("runAsNonRoot") is not True:
            problem(name, "runAsNonRoot must be true")
        if "memory" not in container.get("resources", {}).get("limits", {}):
            problem(name, "no memory limit")


def served_paths():
    http = (ROOT / "src" / "http.rs").read_text(encoding="utf-8")
    return set(re.findall(r'\.route\("([^"]+)"', http))


def measured_peak_rss():
    """The highest peak RSS figure (MiB) in docs/benchmarks.md."""
    text = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    figures = []
    for line in text.splitlines():
        if line.startswith("| worker peak RSS,"):
            cells = line.split("|")[2:-2]  # the measured columns, not the row name or target
            figures += [float(x) for x in re.findall(r"\d+(?:\.\d+)?", " ".join(cells))]
    for match in re.finditer(r"peak RSS ((?:[\d.]+(?: and )?)+) MiB", text):
        figures += [float(x) for x in re.findall(r"\d+(?:\.\d+)", match.group(1))]
    return max(figures) if figures else None


def documented_keys():
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    return set(re.findall(r"`([A-Z][A-Z0-9_]+)`", text)) | CONSOLE_KEYS


def default_of(key):
    """The built-in default of a setting, from docs/configuration.md's table."""
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    match = re.search(rf"^\| `{key}` \| `([^`]*)` \|", text, re.MULTILINE)
    return match.group(1) if match else None


def check_worker(docs, settings):
    deployments = [(p, d) for p, d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "worker-iot-core"]
    if len(deployments) != 1:
        problem("deploy/kubernetes", "expected one Deployment worker-iot-core")
        return None
    path, worker = deployments[0]
    where = rel(path)
    pod = worker["spec"]["template"]["spec"]
    container = pod["containers"][0]
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}

    metrics_addr = setting(container, settings, "METRICS_ADDR", "0.0.0.0:9464")
    metrics_port = int(metrics_addr.rsplit(":", 1)[1])
    if ports.get("metrics") != metrics_port:
        problem(where, f"port `metrics` must be {metrics_port}, the port of METRICS_ADDR={metrics_addr}")
    paths = served_paths()
    for probe, expected in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container.get(probe, {}).get("httpGet")
        if not get:
            problem(where, f"{probe} must be an httpGet of {expected}")
            continue
        if get.get("path") != expected:
            problem(where, f"{probe} asks {get.get('path')}, expected {expected}")
        if get.get("path") not in paths:
            problem(where, f"{probe} asks {get.get('path')}, which src/http.rs does not serve ({sorted(paths)})")
        port = get.get("port")
        if port != "metrics" and port != metrics_port:
            problem(where, f"{probe} asks port {port}, not the metrics port {metrics_port}")

    grace_ms = int(setting(container, settings, "SHUTDOWN_GRACE_MS", 10000))
    budget = grace_ms / 1000 + SHUTDOWN_FIXED_SECONDS
    termination = pod.get("terminationGracePeriodSeconds", 30)
    if termination < budget:
        problem(where, f"terminationGracePeriodSeconds {termination} is below the shutdown budget of {budget:g} s")

    resources = container.get("resources", {})
    request, limit = mib(resources.get("requests", {}).get("memory")), mib(resources.get("limits", {}).get("memory"))
    peak = measured_peak_rss()
    prefetch = int(setting(container, settings, "RABBITMQ_PREFETCH_COUNT", default_of("RABBITMQ_PREFETCH_COUNT")))
    max_bytes = int(setting(container, settings, "MAX_MESSAGE_BYTES", default_of("MAX_MESSAGE_BYTES")))
    if peak is None:
        problem("docs/benchmarks.md", "no peak RSS figure found")
    elif request is None or request < peak:
        problem(where, f"memory request {resources.get('requests', {}).get('memory')} is below the measured peak RSS {peak} MiB")
    elif limit is None or limit < peak + prefetch * max_bytes / 2**20:
        problem(where, f"memory limit below peak RSS {peak} MiB + {prefetch} × {max_bytes} bytes of bodies in flight")

    mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
    config_maps = {d["metadata"]["name"]: d for _, d in by_kind(docs, "ConfigMap")}
    for volume in pod.get("volumes", []):
        name = volume.get("configMap", {}).get("name")
        if name and name not in config_maps:
            problem(where, f"volume {volume['name']} uses ConfigMap {name}, which is not in deploy/kubernetes")
        if name in config_maps:
            for key in ("SETTINGS_FILE", "TOPOLOGY_FILE"):
                value = env_of(container).get(key, {}).get("value", "")
                mount = mounts.get(volume["name"], "")
                if value.startswith(mount + "/") and value[len(mount) + 1 :] not in config_maps[name]["data"]:
                    problem(where, f"{key}={value} is not a key of ConfigMap {name}")

    version = tomllib.loads((ROOT / "Cargo.toml").read_text(encoding="utf-8"))["package"]["version"]
    for _, deployment in by_kind(docs, "Deployment"):
        for c in deployment["spec"]["template"]["spec"]["containers"]:
            name, _, tag = c["image"].rpartition(":")
            registry = name.split("/")[0]
            if "/" not in name or not ("." in registry or ":" in registry or registry == "localhost"):
                problem(where, f"image {c['image']}: name a registry (registry.example.com/worker-iot-core), not a bare name Docker Hub would be asked for")
            if not name.endswith("/worker-iot-core") or tag != version:
                problem(where, f"image {c['image']}: expected <registry>/worker-iot-core:{version} (Cargo.toml)")

    pool = min(prefetch + 2, int(setting(container, settings, "DATABASE_MAX_CONNECTIONS", default_of("DATABASE_MAX_CONNECTIONS"))))
    per_worker = pool + 1  # and the outbox relay's LISTEN connection
    surge = worker["spec"].get("strategy", {}).get("rollingUpdate", {}).get("maxSurge", 1)
    replicas = worker["spec"]["replicas"]
    if (replicas + surge) * per_worker > DATABASE_CONNECTIONS:
        problem(where, f"{replicas} replicas + {surge} in a rollout × {per_worker} connections exceed {DATABASE_CONNECTIONS}")
    for p, scaled in by_kind(docs, "ScaledObject"):
        most = scaled["spec"]["maxReplicaCount"]
        if (most + surge) * per_worker > DATABASE_CONNECTIONS:
            problem(rel(p), f"maxReplicaCount {most} + {surge} × {per_worker} connections exceed {DATABASE_CONNECTIONS}")
        if scaled["spec"]["scaleTargetRef"]["name"] != worker["metadata"]["name"]:
            problem(rel(p), "scaleTargetRef is not the worker Deployment")
        for trigger in scaled["spec"]["triggers"]:
            queue = setting(container, settings, "RABBITMQ_LOCAL_QUEUE_NAME", default_of("RABBITMQ_LOCAL_QUEUE_NAME"))
            if trigger.get("metadata", {}).get("queueName") != queue:
                problem(rel(p), f"scales on queue {trigger.get('metadata', {}).get('queueName')}, not {queue}")
    return worker


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


def check_services(docs, worker):
    pods = [d["spec"]["template"]["metadata"]["labels"] for _, d in by_kind(docs, "Deployment")]
    alerts = (ROOT / "prometheus" / "alerts.yml").read_text(encoding="utf-8")
    jobs = set(re.findall(r'job="([^"]+)"', alerts))
    for path, service in by_kind(docs, "Service"):
        where = f"{rel(path)}: {service['metadata']['name']}"
        if service["spec"].get("type", "ClusterIP") != "ClusterIP":
            problem(where, "must be ClusterIP: nothing is exposed outside the cluster")
        if not any(matches(service["spec"]["selector"], labels) for labels in pods):
            problem(where, "selects no pod of these Deployments")
    if worker is not None:
        metrics = [s for _, s in by_kind(docs, "Service") if "metrics" in {p.get("name") for p in s["spec"]["ports"]}]
        worker_labels = worker["spec"]["template"]["metadata"]["labels"]
        if not any(matches(s["spec"]["selector"], worker_labels) and s["metadata"]["name"] in jobs for s in metrics):
            problem("deploy/kubernetes", f"no metrics Service of the workers named as the alert rules' job ({sorted(jobs)})")
    for path, monitor in by_kind(docs, "ServiceMonitor"):
        selected = [s for _, s in by_kind(docs, "Service") if matches(monitor["spec"]["selector"]["matchLabels"], s["metadata"].get("labels", {}))]
        if not selected:
            problem(rel(path), "selects no Service")
        for endpoint in monitor["spec"]["endpoints"]:
            if not all(endpoint["port"] in {p.get("name") for p in s["spec"]["ports"]} for s in selected):
                problem(rel(path), f"port {endpoint['port']} is not a port of the Services it selects")
    for path, budget in by_kind(docs, "PodDisruptionBudget"):
        if worker is not None and not matches(budget["spec"]["selector"]["matchLabels"], worker["spec"]["template"]["metadata"]["labels"]):
            problem(rel(path), "does not select the workers")


def check_environment(docs, secrets):
    """Every Deployment: documented settings only, Secret keys that exist, and
    the console's token rule."""
    known = documented_keys()
    for path, deployment in by_kind(docs, "Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            env = env_of(container)
            addr = env.get("CONSOLE_ADDR", {}).get("value")
            if addr and not addr.startswith(("127.", "[::1]", "localhost")) and "CONSOLE_TOKEN" not in env:
                problem(rel(path), f"CONSOLE_ADDR={addr} is not loopback: CONSOLE_TOKEN is required (SPEC section 12)")
            for name, entry in env.items():
                if name not in known:
                    problem(rel(path), f"environment variable {name} is not a setting of docs/configuration.md or SPEC section 12")
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["key"] not in secrets.get(ref["name"], {}):
                    problem(rel(path), f"{name} reads key {ref['key']} of Secret {ref['name']}, which secret.example.yaml lacks")


def main():
    docs = list(manifests())
    settings = json.loads((ROOT / "_storage" / "settings.json").read_text(encoding="utf-8"))
    secrets = {d["metadata"]["name"]: d.get("stringData", {}) for d in load_all(KUBE / "secret.example.yaml")}
    check_generated(docs)
    check_kustomizations()
    check_kustomization_targets(tomllib.loads((ROOT / "Cargo.toml").read_text(encoding="utf-8"))["package"]["version"])
    for path, deployment in by_kind(docs, "Deployment"):
        check_pod_security(path, deployment)
    worker = check_worker(docs, settings)
    check_services(docs, worker)
    check_environment(docs, secrets)
    for line in problems:
        print(f"check-kubernetes: {line}")
    if problems:
        return 1
    print(f"check-kubernetes: {len(docs)} manifests agree with the code, the settings, the alert rules and the guides")
    return 0


if __name__ == "__main__":
    sys.exit(main())
