# forkscope-operator on a minimal base: the binary and the C runtime it links, a non-root user,
# no shell (nothing runs but the binary).
#
#   docker build -f images/operator.Dockerfile -t local/forkscope-operator:dev .
#
# BINARIES=prebuilt takes the binary from prebuilt/ in the build context instead of compiling
# it (scripts/images does that: it builds with cargo outside and reaches no registry).
ARG BASE=gcr.io/distroless/cc-debian12:nonroot
ARG RUST=rust:1-bookworm
ARG BINARIES=build

FROM ${RUST} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p forkscope-operator \
    && install -D target/release/forkscope-operator /out/forkscope-operator

FROM scratch AS prebuilt
COPY prebuilt/forkscope-operator /out/forkscope-operator

FROM ${BINARIES} AS binaries

FROM ${BASE}
COPY --from=binaries /out/forkscope-operator /usr/local/bin/forkscope-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/forkscope-operator"]
