//! The leader: binds, optionally preloads, forks workers into slots and keeps them alive.
