//! Process titles, as `ps` and `/proc/PID/cmdline` show them (DESIGN.md "Names").
