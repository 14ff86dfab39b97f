//! forkscope-operator: the kube-rs controller that turns `ProfileRequest`s into sidecar profile
//! sessions.
//!
//! # Layout
//! - [`crd`]: the `ProfileRequest` custom resource (spec, status, schema validation) and the
//!   generated CRD YAML.
//!
//! The reconcile loop, aggregation and metrics arrive in later modules; `main.rs` stays a thin
//! command-line front.

pub mod crd;
