//! Helpers for forkscope's end-to-end tests on a real control plane.
