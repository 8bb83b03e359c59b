"""pyoverlay benchmarks: `bench/run [--quick] [--only NAME]`.

Each benchmark module exposes run(ctx) -> Result; bench.main runs them,
prints the summary table and writes docs/benchmarks.md.
"""
