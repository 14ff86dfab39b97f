"""forkscope's benchmark harness: measures (throughput, memory) and reports (docs/BENCHMARKS.md).

Measuring writes raw JSON under bench/results/; reporting only reads that JSON, so the document
can be regenerated from a saved run without measuring again.
"""
