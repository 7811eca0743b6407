# syntax=docker/dockerfile:1
# Build: the dependencies first (a layer that survives source changes), then Gozon itself.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY migrations/Cargo.toml migrations/Cargo.toml
# The benchmark is a workspace member: its manifest must be there, its code need not be.
COPY bench/Cargo.toml bench/Cargo.toml
RUN mkdir -p src migrations/src bench/src benches tests/api \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs migrations/src/lib.rs \
 && echo 'fn main() {}' > bench/src/main.rs \
 && echo 'fn main() {}' > benches/saga_latency.rs && echo 'fn main() {}' > tests/api/main.rs \
 && cargo build --profile dist --locked --bin gozon \
 && rm -rf src migrations/src
COPY src src
COPY migrations/src migrations/src
RUN touch src/main.rs src/lib.rs migrations/src/lib.rs \
 && cargo build --profile dist --locked --bin gozon

# Run: a small Debian with the binary and the web page, as an unprivileged user.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin gozon
WORKDIR /app
COPY --from=build /src/target/dist/gozon /usr/local/bin/gozon
COPY static /app/static
USER gozon
ENV GOZON_HTTP_ADDR=0.0.0.0:8000 \
    GOZON_STATIC_DIR=/app/static \
    GOZON_LOG_FORMAT=json
EXPOSE 8000
HEALTHCHECK --interval=5s --timeout=3s --retries=20 CMD curl -fsS http://127.0.0.1:8000/health/ready || exit 1
ENTRYPOINT ["gozon"]
CMD ["serve"]
