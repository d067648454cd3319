# syntax=docker/dockerfile:1
# The `server` binary (serve, offload, admin subcommands) on a distroless
# runtime: glibc and CA certificates, no shell, a non-root user.
#
#   docker build -t tenant-kv-server:dev .
#   docker run --rm tenant-kv-server:dev --help

FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p server --no-default-features \
    && cp target/release/server /usr/local/bin/server

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/server /usr/local/bin/server
# By number (distroless's nonroot), so the kubelet can check runAsNonRoot.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/server"]
CMD ["serve"]
