"""Timing: triton.testing.do_bench on a GPU (CUDA events, L2 flushed), wall clock on the CPU."""
import statistics
import time


def measure(fn, device, min_seconds=0.25):
    """Median and 20/80% quantiles of one call, in milliseconds."""
    if device == "cuda":
        import triton

        median, low, high = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=200)
        return {"median_ms": median, "p20_ms": low, "p80_ms": high}
    fn()  # warm up (and compile)
    samples = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_seconds or len(samples) < 5:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    quantiles = statistics.quantiles(samples, n=10)
    return {"median_ms": statistics.median(samples), "p20_ms": quantiles[1], "p80_ms": quantiles[7]}
