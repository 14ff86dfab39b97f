//! Renders `docs/SETTINGS.md` from the clap command.
