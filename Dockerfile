# baton in a container, running the shipped configuration (conf/baton.toml): one service, `web`, on port
# 8080, served by Python's built-in HTTP server, with the admin API (/status, /metrics, reload) on the
# container's loopback port 9900, reachable from inside the container:
#   docker exec CONTAINER python3 -c \
#     "import urllib.request as u; print(u.urlopen('http://127.0.0.1:9900/status').read().decode())"
#
#   docker build -t baton .
#   docker run --rm -p 8080:8080 baton
#
# To run your own services, mount a configuration over /etc/baton/baton.toml (and install what its
# workers need in an image built FROM this one); `docker kill --signal HUP` reloads it with no
# connection lost.

# ---- build ---------------------------------------------------------------------------------------------
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY src/ src/
# Cargo.toml declares a bin target (tests/worker/main.rs) and an integration test (tests/it/main.rs): the
# manifest does not load without them, even to build only `baton`.
COPY tests/ tests/
COPY conf/ conf/
RUN cargo build --release --locked --bin baton

# ---- runtime -------------------------------------------------------------------------------------------
FROM debian:bookworm-slim

# python3: the shipped configuration's worker is `python3 -m http.server`.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A non-root user with a fixed numeric id, so that orchestrators can check it is not root.
# /srv/baton is baton's working directory, which its workers inherit: http.server serves the files of its
# working directory, so it gets an empty one rather than the file system's root.
RUN groupadd --gid 10001 baton \
    && useradd --uid 10001 --gid baton --no-log-init --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin baton \
    && mkdir -p /srv/baton

COPY --from=build /src/target/release/baton /usr/local/bin/baton

# The shipped configuration listens on loopback (127.0.0.1). Inside a container loopback is the
# container's own and is not reachable from outside, not even through a published port, so the image's
# copy serves the service on every IPv4 address of the container instead. The worker keeps binding
# 127.0.0.1: only baton, in the same container, dials it.
# The admin API stays on the container's loopback: baton refuses a non-loopback admin address unless
# [admin] token_file is set. To reach it from outside, mount a configuration with
#   [admin]
#   listen = "0.0.0.0:9900"
#   token_file = "/run/secrets/baton-admin-token"
# and publish 9900 to trusted networks only.
# The build fails if conf/baton.toml changes so that this substitution no longer applies.
COPY conf/baton.toml /etc/baton/baton.toml
RUN sed -i \
        -e 's|^listen = \["127\.0\.0\.1:8080"].*$|listen = ["0.0.0.0:8080"]|' \
        /etc/baton/baton.toml \
    && grep -qxF 'listen = ["0.0.0.0:8080"]' /etc/baton/baton.toml \
    && /usr/local/bin/baton check --config /etc/baton/baton.toml

USER 10001:10001
WORKDIR /srv/baton
EXPOSE 8080

# On SIGTERM baton stops accepting, lets open connections finish (up to the service's drain_timeout, 30s
# in the shipped configuration), then stops the workers (up to stop_timeout, 10s). Give it that long
# before the runtime kills it: `docker stop --time 45`, Compose's `stop_grace_period: 45s`, Kubernetes'
# `terminationGracePeriodSeconds: 45`.
# As PID 1, baton reaps every process orphaned to it (a worker's children whose parent exited, double-forked
# daemons) as well as its own workers: no `--init` is needed. It handles SIGTERM, SIGINT, SIGHUP and
# SIGUSR2 itself, as PID 1 gets no default action for them.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/baton"]
CMD ["run", "--config", "/etc/baton/baton.toml"]
