//! The profiler doorbell inside every worker: tracemalloc heap diffs and stack dumps (DESIGN.md).
