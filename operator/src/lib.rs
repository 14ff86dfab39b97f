//! forkscope-operator: the kube-rs controller that turns `ProfileRequest`s into sidecar profile
//! sessions and writes the aggregated result into their status.
//!
//! # Layout
//! - [`crd`]: the `ProfileRequest` custom resource (spec, status, schema validation) and the
//!   generated CRD YAML.
//! - [`request`]: one request's state machine (select, start, collect, finish), written against
//!   the [`sidecar::Sidecars`] trait so it is tested with a fake.
//! - [`aggregate`]: pure merging of worker diffs and stacks across workers and pods.
//! - [`sidecar`]: the sidecar calls, over the sidecar crate's client.
//! - [`token`]: the bearer token shown to sidecars (static file or ServiceAccount tokens).
//! - [`controller`]: the Kubernetes side: watch, finalizer, status writes, events, TTL.
//! - [`lease`]: leader election on a `coordination.k8s.io` Lease.
//! - [`metrics`], [`serve`]: `/metrics`, `/healthz`, `/readyz`.

pub mod aggregate;
pub mod controller;
pub mod crd;
pub mod lease;
pub mod metrics;
pub mod request;
pub mod serve;
pub mod sidecar;
pub mod token;
