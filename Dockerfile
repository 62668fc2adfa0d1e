# Multi-stage build of worker-iot-core.
#
#   docker build -t worker-iot-core .
#   docker compose up                    # worker + rabbitmq + postgres + jaeger
#   docker compose run --rm worker-iot-core bin/requeue --list
#   docker compose run --rm test         # the test suite, in the builder stage

# --- builder: compiles every binary; also the image the `test` service runs in
FROM rust:1.95-bookworm AS builder
WORKDIR /src
# No sqlx query! macros may reach for a database while compiling: they read .sqlx/.
ENV SQLX_OFFLINE=true
# The whole context (less .dockerignore) so `cargo test` in this stage sees
# tests/, migrations/, topology/ and _storage/ as in the repository.
COPY . .
RUN cargo build --release --locked --bins

# --- runtime: only the binaries and the files they read at start-up
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home \
      --shell /usr/sbin/nologin app
WORKDIR /app
COPY --from=builder \
     /src/target/release/worker-iot-core \
     /src/target/release/requeue \
     /src/target/release/create_db \
     /src/target/release/delete_db \
     /src/target/release/publish \
     /app/bin/
# Relative paths in settings (TOPOLOGY_FILE, SETTINGS_FILE) resolve from /app.
COPY topology/ /app/topology/
COPY _storage/ /app/_storage/
ENV PATH=/app/bin:$PATH
USER app
# /metrics, /healthz, /readyz (METRICS_ADDR)
EXPOSE 9464
# No ENTRYPOINT, so `docker compose run --rm worker-iot-core bin/requeue …`
# runs another binary in place of the worker.
CMD ["bin/worker-iot-core"]
