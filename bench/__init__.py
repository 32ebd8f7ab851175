"""Microbenchmarks (installed as musetalk_fast.bench): `musetalk-fast-bench` runs them all."""
