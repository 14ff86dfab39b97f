//! Interpreter start-up, import paths, the app import, preload and the fork hooks.
