//! THE settings table: one declaration per setting gives its flag, env var and config-file name.
