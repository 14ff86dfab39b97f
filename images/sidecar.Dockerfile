# forkscope-sidecar on a minimal base: the binary and the C runtime it links, a non-root user,
# no shell (nothing runs but the binary).
#
#   docker build -f images/sidecar.Dockerfile -t local/forkscope-sidecar:dev .
#
# BINARIES=prebuilt takes the binary from prebuilt/ in the build context instead of compiling
# it (scripts/images does that: it builds with cargo outside and reaches no registry).
ARG BASE=gcr.io/distroless/cc-debian12:nonroot
ARG RUST=rust:1-bookworm
ARG BINARIES=build

FROM ${RUST} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p forkscope-sidecar \
    && install -D target/release/forkscope-sidecar /out/forkscope-sidecar

FROM scratch AS prebuilt
COPY prebuilt/forkscope-sidecar /out/forkscope-sidecar

FROM ${BINARIES} AS binaries

FROM ${BASE}
COPY --from=binaries /out/forkscope-sidecar /usr/local/bin/forkscope-sidecar
USER 65532:65532
EXPOSE 9808
ENTRYPOINT ["/usr/local/bin/forkscope-sidecar"]
