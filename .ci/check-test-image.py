#!/usr/bin/env python3
"""Fail if the compose `test` service cannot run the tests it is for.

    python3 .ci/check-test-image.py

The tests' prerequisites are documented once, in docs/development.md,
"What the tests need": a table of the commands the tests run (with the
Debian package of each, and whether the compose test image must hold it)
and a table of the environment variables they read. This checks, without a
Docker engine:

  - every command a test starts (`Command::new("NAME")`, or a constant
    `"/usr/bin/NAME"`) is a row of the first table: a new one is documented
    or CI fails;
  - every variable a test reads (`std::env::var("NAME")` of the shared
    environment, tests/it/common/mod.rs) is a row of the second table;
  - the Dockerfile stage the `test` service builds (and the stages it is
    built FROM) installs every package marked `yes` with apt-get, and its
    base image is `rust:<Cargo.toml's rust-version>-...`;
  - the service's environment (env_file and environment) sets every
    variable of the second table; AMQP_URL logs in with the user and
    password the `rabbitmq` service creates, at its host name, and
    DATABASE_URL as the `postgres` service's superuser at its host name;
  - the service runs `cargo test ... --all-features`.

Prints one line per problem and exits 1; never prints a password.
"""
import pathlib
import re
import shlex
import sys
from urllib.parse import unquote, urlsplit

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs/development.md"
SECTION = "### What the tests need"
SHARED_ENV = ROOT / "tests/it/common/mod.rs"

COMMAND = re.compile(r'Command::new\(\s*"([^"]+)"\s*\)')
PROGRAM_PATH = re.compile(r'const\s+\w+:\s*&str\s*=\s*"/usr/bin/([^"/]+)"')
ENV_READ = re.compile(r'std::env::var\(\s*"([A-Z_]+)"\s*\)')
CODE = re.compile(r"`([^`]+)`")

problems = []


def problem(text):
    problems.append(text)


def doc_tables():
    """The rows of the two tables of the section, as lists of cells."""
    text = DOC.read_text(encoding="utf-8")
    if SECTION not in text:
        problem(f"docs/development.md: no section {SECTION!r}")
        return [], []
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    tables, rows = [], None
    for line in section.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if rows is None:
                rows = []  # the header row
            elif not set("".join(cells)) <= set("-: "):
                rows.append(cells)
        elif rows is not None:
            tables.append(rows)
            rows = None
    if rows is not None:
        tables.append(rows)
    if len(tables) != 2:
        problem(f"docs/development.md, {SECTION!r}: expected 2 tables (commands, variables), found {len(tables)}")
        return [], []
    return tables[0], tables[1]


def test_sources():
    return sorted(p for p in (ROOT / "tests").rglob("*.rs") if "fuzz_regressions" not in p.parts)


def commands_run_by_tests():
    found = {}
    for path in test_sources():
        text = path.read_text(encoding="utf-8")
        for name in COMMAND.findall(text) + PROGRAM_PATH.findall(text):
            found.setdefault(name, path.relative_to(ROOT))
    return found


def dockerfile_stages():
    """stage name -> (FROM image, the stage's RUN lines joined)."""
    stages, current = {}, None
    logical = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text(encoding="utf-8"))
    for line in logical.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0].upper() == "FROM":
            name = words[3] if len(words) >= 4 and words[2].upper() == "AS" else f"#{len(stages)}"
            current = name
            stages[name] = [words[1], ""]
        elif words[0].upper() == "RUN" and current:
            stages[current][1] += " " + " ".join(words[1:])
    return stages


def installed_packages(stages, target):
    """Packages apt-get installs in `target` and the stages it is FROM; its root image."""
    packages, seen = set(), set()
    while target in stages and target not in seen:
        seen.add(target)
        image, runs = stages[target]
        for command in re.split(r"&&|;", runs):
            words = shlex.split(command)
            if words[:2] == ["apt-get", "install"]:
                packages.update(w for w in words[2:] if not w.startswith("-"))
        target = image
    return packages, target


def env_file(path):
    values = {}
    for line in (ROOT / path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip()
    return values


def service_env(service):
    values = {}
    files = service.get("env_file", [])
    for path in [files] if isinstance(files, str) else files:
        values.update(env_file(path))
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    values.update({k: str(v) for k, v in environment.items()})
    return values


def check_commands(commands_table):
    documented = {}
    for row in commands_table:
        for name in CODE.findall(row[0]):
            documented[name] = row
    for name, path in commands_run_by_tests().items():
        if name not in documented:
            problem(f"{path}: runs `{name}`, which docs/development.md, \"What the tests need\" does not name")
    return documented


def check_image(commands_table, compose, rust_version):
    test = compose["services"].get("test")
    if test is None:
        problem("docker-compose.yml: no service `test`")
        return
    build = test.get("build", {})
    target = build.get("target") if isinstance(build, dict) else None
    stages = dockerfile_stages()
    if target not in stages:
        problem(f"docker-compose.yml: service test builds target {target!r}, not a stage of the Dockerfile")
        return
    packages, root = installed_packages(stages, target)
    for row in commands_table:
        if not row[3].startswith("yes") or not row[1].startswith("`"):
            continue
        for package in CODE.findall(row[1]):
            if package not in packages:
                problem(f"Dockerfile: stage {target} does not apt-get install `{package}` (docs/development.md: the image holds it)")
    if not re.fullmatch(rf"rust:{re.escape(rust_version)}(-.*)?", root):
        problem(f"Dockerfile: stage {target} is built on {root}, not rust:{rust_version} (Cargo.toml's rust-version)")
    command = test.get("command", [])
    command = shlex.split(command) if isinstance(command, str) else command
    if command[:2] != ["cargo", "test"] or "--all-features" not in command:
        problem(f"docker-compose.yml: service test runs {command}, not cargo test --all-features")


def check_environment(variables_table, compose):
    services = compose["services"]
    env = service_env(services.get("test", {}))
    read = set(ENV_READ.findall(SHARED_ENV.read_text(encoding="utf-8")))
    documented = {name for row in variables_table for name in CODE.findall(row[0])}
    for name in sorted(read - documented):
        problem(f"tests/it/common/mod.rs reads {name}, which docs/development.md, \"What the tests need\" does not name")
    for name in sorted(documented):
        if name not in env:
            problem(f"docker-compose.yml: service test does not set {name}")
    broker = service_env(services.get("rabbitmq", {}))
    database = service_env(services.get("postgres", {}))
    checks = [
        ("AMQP_URL", "rabbitmq", broker.get("RABBITMQ_DEFAULT_USER", "guest"), broker.get("RABBITMQ_DEFAULT_PASS", "guest")),
        ("DATABASE_URL", "postgres", database.get("POSTGRES_USER", "postgres"), database.get("POSTGRES_PASSWORD")),
    ]
    for name, host, user, password in checks:
        if name not in env:
            continue
        url = urlsplit(env[name])
        if url.hostname != host:
            problem(f"service test: {name} names host {url.hostname!r}, not the service {host!r}")
        if unquote(url.username or "") != user or unquote(url.password or "") != (password or ""):
            problem(f"service test: {name} does not log in as the user the {host} service creates ({user!r}) with its password")


def main():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    cargo = (ROOT / "Cargo.toml").read_text(encoding="utf-8")
    rust_version = re.search(r'^rust-version\s*=\s*"([^"]+)"', cargo, re.M).group(1)
    commands_table, variables_table = doc_tables()
    if commands_table:
        check_commands(commands_table)
        check_image(commands_table, compose, rust_version)
        check_environment(variables_table, compose)
    for line in problems:
        print(f"check-test-image: {line}", file=sys.stderr)
    if problems:
        return 1
    print("check-test-image: the compose test service holds and sets what the tests need")
    return 0


if __name__ == "__main__":
    sys.exit(main())
