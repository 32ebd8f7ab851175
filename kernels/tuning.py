"""Launch configs of the Triton kernels: shipped tables per GPU, a heuristic otherwise, tuning on request.

Each kernel has a search space of configs (block sizes, warps, stages) and a heuristic. A launch
looks its key (dtype, head dim, ... and power-of-two size buckets) up in

1. kernels/configs/<GPU name>.json, the table shipped for this GPU: the exact key, else the same
   key at the nearest size buckets;
2. the kernel's heuristic (unknown GPUs, keys the table lacks), shrunk to the GPU's shared memory.

Nothing is timed unless MUSETALK_FAST_AUTOTUNE=1: then the first launch of each new key times every
config of the search space once, keeps the fastest, and `python -m musetalk_fast.bench.tune`
writes what was tuned into the GPU's table (as vLLM ships per-device configs for its MoE kernels).
A config whose compiled kernel uses local memory (register spills: the driver's n_spills) is never
timed nor shipped; the launch closures return the compiled kernel so the tuner can see it.
A config the GPU cannot run (too much shared memory) falls back to the kernel's smallest config.
"""
import json
import math
import os
import re
from pathlib import Path

CONFIG_DIR = Path(__file__).with_name("configs")
AUTOTUNE_ENV = "MUSETALK_FAST_AUTOTUNE"
LAUNCH_OPTIONS = ("num_warps", "num_stages")  # the rest of a config are the kernel's constexprs


def tuning_enabled():
    return os.environ.get(AUTOTUNE_ENV) == "1"


def gpu_name(device=None):
    """The CUDA device's name as a file name, e.g. NVIDIA_H100_80GB_HBM3."""
    import torch

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", torch.cuda.get_device_name(device))


def size_bucket(n):
    """Sizes share a config within a power of two."""
    return 1 << max(int(n) - 1, 0).bit_length()


def _shared_memory_bytes(device):
    import triton

    try:
        return triton.runtime.driver.active.utils.get_device_properties(device.index or 0)["max_shared_mem"]
    except Exception:  # the interpreter has no device properties
        return None


class Table:
    """The configs of one GPU: shipped entries plus what this process tuned."""

    def __init__(self, name):
        self.name = name
        self.path = CONFIG_DIR / f"{name}.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {"gpu": name, "kernels": {}}
        self.tuned = []  # (kernel, entry) pairs found by tuning in this process

    def entries(self, kernel):
        return self.data["kernels"].get(kernel, [])

    def add(self, kernel, entry):
        self.data["kernels"].setdefault(kernel, [])
        self.data["kernels"][kernel] = [e for e in self.entries(kernel)
                                        if (e["match"], e["sizes"]) != (entry["match"], entry["sizes"])] + [entry]
        self.tuned.append((kernel, entry))


_tables = {}


def table_for(device):
    name = gpu_name(device) if device.type == "cuda" else "interpreter"
    if name not in _tables:
        _tables[name] = Table(name)
    return _tables[name]


class KernelConfigs:
    """Launch configs of one Triton kernel.

    space:     every config the tuner may try (dicts of constexprs and num_warps/num_stages), or
               key -> that list where it depends on the key;
    heuristic: key -> config, used when no table entry matches;
    smallest:  key -> the config that runs everywhere (when another does not fit; Triton's interpreter);
    shared:    (config, key) -> estimated shared-memory bytes, to shrink the heuristic to the GPU.
    """

    def __init__(self, name, space, heuristic, smallest, shared=None):
        self.name, self.space, self.heuristic, self.smallest, self.shared = name, space, heuristic, smallest, shared
        self._chosen = {}  # (device, key) -> config, so each key is resolved once per process

    def launch(self, run, device, match, sizes=None):
        """run(config) launches the kernel; match holds the exact fields of the key, sizes the bucketed ones."""
        sizes = {name: size_bucket(value) for name, value in (sizes or {}).items()}
        cache_key = (str(device), tuple(sorted(match.items())), tuple(sorted(sizes.items())))
        config = self._chosen.get(cache_key)
        if config is None:
            config = self._resolve(run, device, match, sizes)
        try:
            result = run(config)
        except Exception as error:
            if config == self.smallest(match) or type(error).__name__ != "OutOfResources":
                raise
            config = self.smallest(match)
            result = run(config)
        self._chosen[cache_key] = config
        return result

    def _resolve(self, run, device, match, sizes):
        if device.type != "cuda":  # Triton's CPU interpreter: correctness only
            return self.smallest(match)
        table = table_for(device)
        if tuning_enabled():  # each new key is timed afresh: what the table holds is being replaced
            return self._tune(table, run, match, sizes)
        found = self._lookup(table, match, sizes)
        return found if found is not None else self.heuristic_config(match, _shared_memory_bytes(device))

    def _lookup(self, table, match, sizes):
        """The entry for this key, else the one of the same match at the nearest size buckets."""
        best, best_distance = None, math.inf
        for entry in table.entries(self.name):
            if entry["match"] != match or set(entry["sizes"]) != set(sizes):
                continue
            distance = sum(abs(math.log2(entry["sizes"][k]) - math.log2(v)) for k, v in sizes.items())
            if distance < best_distance:
                best, best_distance = entry["config"], distance
        return best

    def heuristic_config(self, match, shared_limit=None):
        """The heuristic's config, shrunk until its shared-memory estimate fits `shared_limit` bytes:
        stages down to 2, then the largest block halved (down to 16), then a single stage."""
        config = dict(self.heuristic(match))
        if self.shared is None or shared_limit is None:
            return config
        while self.shared(config, match) > shared_limit:
            if config.get("num_stages", 1) > 2:
                config["num_stages"] -= 1
                continue
            blocks = [k for k in config if k.startswith("BLOCK_") and config[k] > 16]
            if blocks:
                config[max(blocks, key=lambda k: config[k])] //= 2
            elif config.get("num_stages", 1) > 1:
                config["num_stages"] = 1
            else:
                break  # the floor: if even this does not fit, the launch says so
        return config

    def _tune(self, table, run, match, sizes):
        """Time every config of the space on this key; keep (and record) the fastest."""
        import triton.testing

        space = self.space(match) if callable(self.space) else self.space
        timings, spilling = [], 0
        for config in space:
            try:
                launched = run(config)  # run returns the compiled kernel (or the op's result, for a few)
                if getattr(launched, "n_spills", 0):  # local memory (register spills, stack): never shipped
                    spilling += 1
                    continue
                ms = triton.testing.do_bench(lambda: run(config), warmup=5, rep=25)
            except Exception as error:  # a config this GPU cannot run (shared memory, registers)
                if type(error).__name__ not in ("OutOfResources", "CompilationError"):
                    raise
                continue
            timings.append((ms, config))
        if not timings:
            return self.smallest(match)
        ms, config = min(timings, key=lambda t: t[0])
        table.add(self.name, {"match": match, "sizes": sizes, "config": config, "ms": round(ms, 5),
                              "from": f"tuned over {len(space)} configs ({spilling} skipped: they spill)"})
        return config


def split_options(config):
    """(constexprs, launch options) of a config."""
    return ({k: v for k, v in config.items() if k not in LAUNCH_OPTIONS},
            {k: v for k, v in config.items() if k in LAUNCH_OPTIONS})


def tuned_entries():
    """(kernel, entry) for every key tuned in this process."""
    return [pair for table in _tables.values() for pair in table.tuned]


def write_tuned_tables():
    """Write every table this process tuned into kernels/configs/; returns the paths written."""
    from musetalk_fast.files import atomic_write_text

    written = []
    for table in _tables.values():
        if not table.tuned or table.name == "interpreter":
            continue
        CONFIG_DIR.mkdir(exist_ok=True)
        table.data["command"] = "python -m musetalk_fast.bench.tune"
        for kernel in table.data["kernels"]:
            table.data["kernels"][kernel].sort(key=lambda e: json.dumps([e["match"], e["sizes"]], sort_keys=True))
        # atomically: a kill mid-write leaves the old table whole (every later launch reads it)
        atomic_write_text(table.path, json.dumps(table.data, indent=1, sort_keys=True) + "\n")
        written.append(table.path)
    return written
