"""asv benchmark suite of ds4bench (see asv.conf.json and benchmarks/bench_decode.py)."""
