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

Prints one line per problem and exits 1; the configuration itself (it holds
the passwords from `env`) is never printed.
"""
import subprocess
import sys

import yaml

# Image name (last path component, before the tag) prefix -> data directory.
STATEFUL = {"rabbitmq": "/var/lib/rabbitmq", "postgres": "/var/lib/postgresql/data"}
ALL_INTERFACES = {"", "0.0.0.0", "::", "[::]"}


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


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "docker-compose.yml"
    out = subprocess.run(["docker-compose", "-f", path, "config"], stdout=subprocess.PIPE)
    if out.returncode != 0:  # docker-compose has said why on stderr
        sys.exit(f"check-compose: {path}: `docker-compose config` failed")
    found = list(problems(yaml.safe_load(out.stdout)))
    for problem in found:
        print(f"check-compose: {path}: {problem}", file=sys.stderr)
    if found:
        sys.exit(1)
    print(f"check-compose: {path}: stateful services keep their data and listen on chosen interfaces only")


if __name__ == "__main__":
    main()
