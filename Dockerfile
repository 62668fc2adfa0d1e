# syntax=docker/dockerfile:1
# Multi-stage build of worker-iot-core (BuildKit: the default builder of
# Docker 23+ and of `docker compose`).
#
#   docker build -t worker-iot-core .
#   docker compose up                    # worker + rabbitmq + postgres + jaeger
#   docker compose run --rm worker-iot-core bin/requeue --list
#   docker compose run --rm test         # the test suite, in the test stage

# --- toolchain: Rust 1.95 (Cargo.toml's rust-version) on Debian bookworm
FROM rust:1.95-bookworm AS toolchain
WORKDIR /src
# No sqlx query! macros may reach for a database while compiling: they read .sqlx/.
ENV SQLX_OFFLINE=true

# --- test: the image the compose `test` service runs `cargo test` in. It
# holds what the tests run besides the services (docs/development.md, "What
# the tests need"; .ci/check-test-image fails CI when a package is missing):
# a browser for the console's tests, kill (procps) and script (bsdutils) for
# the signal and terminal tests (the TLS tests make their CA in memory). Not rabbitmqctl:
# the tests that need it skip here and say so.
FROM toolchain AS test
RUN apt-get update \
 && apt-get install -y --no-install-recommends chromium chromium-driver procps bsdutils \
 && rm -rf /var/lib/apt/lists/*
# The whole context (less .dockerignore) so `cargo test` sees tests/,
# migrations/, topology/ and _storage/ as in the repository.
COPY . .
CMD ["cargo", "test", "--locked", "--all-features"]

# --- builder: compiles every binary
FROM toolchain AS builder
COPY . .
# The crate registry and target/ are BuildKit cache mounts: they outlive the
# build on this builder, so any change to the context recompiles only this
# crate, not its ~300 dependencies. They are not part of the image, hence the
# copy of the binaries to /out/bin. (The `test` service compiles into its own
# volume, see docker-compose.yml.)
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
 && mkdir -p /out/bin \
 && cp target/release/worker-iot-core \
       target/release/requeue \
       target/release/create_db \
       target/release/delete_db \
       target/release/publish \
       target/release/console \
       /out/bin/
# Shell completions and man pages, written by each binary's hidden flags
# from the same clap definition that parses its command line.
RUN mkdir -p /out/bash /out/zsh /out/fish /out/man \
 && for bin in worker-iot-core requeue create_db delete_db publish console; do \
      /out/bin/$bin --generate-completions bash > /out/bash/$bin \
   && /out/bin/$bin --generate-completions zsh > /out/zsh/_$bin \
   && /out/bin/$bin --generate-completions fish > /out/fish/$bin.fish \
   && /out/bin/$bin --generate-man /out/man \
   || exit 1; \
    done

# --- runtime: only the binaries and the files they read at start-up
FROM debian:bookworm-slim
# The package version (Cargo.toml) unless given: --build-arg VERSION=...;
# SOURCE is the repository's URL: --build-arg SOURCE=https://...
ARG VERSION=0.1.0
ARG SOURCE=""
LABEL org.opencontainers.image.title="worker-iot-core" \
      org.opencontainers.image.description="The message worker of an edge IoT platform: RabbitMQ in, PostgreSQL transactions, ack after commit." \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.version="${VERSION}"
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home \
      --shell /usr/sbin/nologin app
WORKDIR /app
COPY --from=builder /out/bin/ /app/bin/
# `requeue --<TAB>` and `man requeue` (bash-completion and man-db are not in
# this slim image; the files are where they look when installed).
COPY --from=builder /out/bash/ /usr/share/bash-completion/completions/
COPY --from=builder /out/zsh/ /usr/share/zsh/vendor-completions/
COPY --from=builder /out/fish/ /usr/share/fish/vendor_completions.d/
COPY --from=builder /out/man/ /usr/share/man/man1/
# Relative paths in settings (TOPOLOGY_FILE, SETTINGS_FILE) resolve from /app.
COPY topology/ /app/topology/
COPY _storage/ /app/_storage/
ENV PATH=/app/bin:$PATH
USER app
# /metrics, /healthz, /readyz (METRICS_ADDR)
EXPOSE 9464
# Healthy while /readyz on METRICS_ADDR answers 200 (connected and consuming):
# the binary does the GET, so the image needs no curl.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/app/bin/worker-iot-core", "--healthcheck"]
# No ENTRYPOINT, so `docker compose run --rm worker-iot-core bin/requeue …`
# runs another binary in place of the worker.
CMD ["bin/worker-iot-core"]
