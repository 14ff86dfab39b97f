//! This process' folder in the runtime directory shared with the sidecar.
