//! Shared helpers of the integration tests: start real binaries, wait for readiness, clean up.
