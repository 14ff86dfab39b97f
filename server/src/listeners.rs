//! Parses `--bind` addresses and binds or inherits the listening sockets.
