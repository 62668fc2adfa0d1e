#!/usr/bin/env python3
"""Fail if a stateful compose service could lose its data or is exposed.

    python3 .ci/check-compose.py [docker-compose.yml]

Reads the resolved configuration (`docker-compose -f FILE config`: env files,
interpolation and short syntax already expanded) and, for every service whose
image is rabbitmq* or postgres*, requires:

  - a named volume (declared under top-level `volumes:`) on its data directory
    or a parent of it: RabbitMQ's queues and messages (the DLQ) and
    PostgreSQL's tables live there;
  - for rabbitmq, a fixed `hostname:`: the node keeps its data under
    rabbit@<hostname>, so a new random hostname means an empty broker;
  - no published port on all interfaces (no host IP, 0.0.0.0 or ::).

And, for every service, that it holds only its own secrets: each password
(a variable of SECRETS below) may appear, as a value or inside a URL, only
in the environments of the services SECRETS names for it; a variable that
looks like a secret (PASS, TOKEN, SECRET in its name) must be listed there;
and the worker does not log in to PostgreSQL as the superuser.

Prints one line per problem and exits 1; the configuration itself (it holds
the passwords of the env files) is never printed.
"""
import re
import subprocess
import sys
from urllib.parse import unquote, urlsplit

import yaml

# Image name (last path component, before the tag) prefix -> data directory.
STATEFUL = {"rabbitmq": "/var/lib/rabbitmq", "postgres": "/var/lib/postgresql/data"}
ALL_INTERFACES = {"", "0.0.0.0", "::", "[::]"}

# Each secret variable -> the services whose environment may hold its value
# (as itself, or as the password of a URL). A new service that needs one is
# added here on purpose; one that is not listed may not see it.
SECRETS = {
    # The PostgreSQL superuser: the database, and the tests (they create and
    # drop a database each).
    "POSTGRES_PASSWORD": {"postgres", "test"},
    # The worker's database role: created by the database's init script,
    # used by the worker and the console (which acts on the same lot).
    "WORKER_DB_PASSWORD": {"postgres", "worker-iot-core", "console"},
    # The broker's user: the broker, the worker, the console (its retries
    # publish) and the tests log in as it.
    "RABBITMQ_DEFAULT_PASS": {"rabbitmq", "worker-iot-core", "console", "test"},
    # The same user's password, for the device tests' MQTT clients.
    "MQTT_PASSWORD": {"rabbitmq", "worker-iot-core", "console", "test"},
    # The console's tokens: the console only.
    "CONSOLE_TOKEN": {"console"},
    "CONSOLE_VIEWER_TOKEN": {"console"},
}
SECRET_NAME = re.compile(r"PASS|TOKEN|SECRET", re.IGNORECASE)
WORKER = "worker-iot-core"


def host_ip(port):
    """Host IP of a `ports:` entry as `config` prints it (string or mapping)."""
    if isinstance(port, dict):
        return str(port.get("host_ip", ""))
    spec = str(port).split("/")[0]  # [ip:][host_port:]container_port[/proto]
    return spec.rsplit(":", 2)[0] if spec.count(":") >= 2 else ""


def volume_mount(volume):
    """(source, target) of a `volumes:` entry (string or mapping)."""
    if isinstance(volume, dict):
        return volume.get("source", ""), volume.get("target", "")
    parts = str(volume).split(":")
    return (parts[0], parts[1]) if len(parts) > 1 else ("", parts[0])


def problems(config):
    named = set(config.get("volumes") or {})
    checked = 0
    for name, service in (config.get("services") or {}).items():
        image = str(service.get("image", "")).split("/")[-1]
        kind = next((k for k in STATEFUL if image.startswith(k)), None)
        if kind is None:
            continue
        checked += 1
        data = STATEFUL[kind]
        if not any(
            source in named and (data == target or data.startswith(target.rstrip("/") + "/"))
            for source, target in map(volume_mount, service.get("volumes") or [])
        ):
            yield f"{name}: no named volume on {data}: its data goes with the container"
        if kind == "rabbitmq" and not service.get("hostname"):
            yield f"{name}: no fixed hostname: the node name (rabbit@<hostname>) and its data change every container"
        if service.get("network_mode") == "host":
            yield f"{name}: network_mode host listens on all interfaces"
        for port in service.get("ports") or []:
            if host_ip(port) in ALL_INTERFACES:
                yield f"{name}: port {port} is published on all interfaces; bind it to 127.0.0.1"
    if checked == 0:
        yield "no rabbitmq or postgres service found: nothing was checked"


def environment(service):
    """A service's resolved environment as a dict (`config` prints a mapping,
    older versions a list of KEY=VALUE)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def url_password(value):
    """The password of each URL in a value (comma-separated lists too)."""
    for part in value.split(","):
        try:
            password = urlsplit(part.strip()).password
        except ValueError:
            continue
        if password:
            yield unquote(password)


def secret_problems(config):
    services = {name: environment(service) for name, service in (config.get("services") or {}).items()}
    values = {}  # secret variable -> its value, where a service sets it
    for name, env in services.items():
        for key, value in env.items():
            if SECRET_NAME.search(key) and key not in SECRETS:
                yield f"{name}: {key} looks like a secret but is not listed in SECRETS (.ci/check-compose.py)"
            if key in SECRETS and value:
                values[key] = value
    for key, value in values.items():
        for name, env in services.items():
            if name in SECRETS[key]:
                continue
            if any(v == value or value in url_password(v) for v in env.values()):
                yield f"{name}: holds the value of {key}, which only {', '.join(sorted(SECRETS[key]))} may"
    for url in [services.get(WORKER, {}).get("DATABASE_URL", "")]:
        user = urlsplit(url.split(",")[0]).username if url else None
        if user == "postgres":
            yield f"{WORKER}: DATABASE_URL logs in as the superuser postgres; use the worker's role"


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "docker-compose.yml"
    out = subprocess.run(["docker-compose", "-f", path, "config"], stdout=subprocess.PIPE)
    if out.returncode != 0:  # docker-compose has said why on stderr
        sys.exit(f"check-compose: {path}: `docker-compose config` failed")
    config = yaml.safe_load(out.stdout)
    found = list(problems(config)) + list(secret_problems(config))
    for problem in found:
        print(f"check-compose: {path}: {problem}", file=sys.stderr)
    if found:
        sys.exit(1)
    print(f"check-compose: {path}: stateful services keep their data and listen on chosen interfaces only;"
          " each service holds only its own secrets")


if __name__ == "__main__":
    main()
