"""Launch configs (kernels/tuning.py): shipped tables, nearest-bucket lookup, heuristics that fit the
GPU's shared memory, the fallback when a config does not fit, tuning off unless asked for."""
import json
import os

import pytest
import torch

from musetalk_fast.kernels import gated_attention as ga
from musetalk_fast.kernels import sinkhorn as sk
from musetalk_fast.kernels import tuning

KERNELS = {k.name: k for k in (ga.FWD, ga.BWD, ga.DQ, ga.PREPROCESS, sk.FWD, sk.BWD)}
H100_SHARED = 227 * 1024
ATTENTION_KEYS = [dict(dtype=t, D=d, causal=c) for t in ("bf16", "fp16", "fp32", "fp64")
                  for d in (16, 32, 64, 128, 256) for c in (False, True)]


def test_tuning_is_off_unless_asked(monkeypatch):
    for value in (None, "0", "", "yes"):
        if value is None:
            monkeypatch.delenv(tuning.AUTOTUNE_ENV, raising=False)
        else:
            monkeypatch.setenv(tuning.AUTOTUNE_ENV, value)
        assert not tuning.tuning_enabled()
    monkeypatch.setenv(tuning.AUTOTUNE_ENV, "1")
    assert tuning.tuning_enabled()


@pytest.mark.parametrize("path", sorted(tuning.CONFIG_DIR.glob("*.json")), ids=lambda p: p.name)
def test_shipped_tables_hold_configs_the_kernels_take(path):
    data = json.loads(path.read_text())
    assert data["gpu"] == path.stem and isinstance(data["kernels"], dict)  # empty until a GPU run tunes
    for name, entries in data["kernels"].items():
        kernel = KERNELS[name]
        for entry in entries:
            space = kernel.space(entry["match"]) if callable(kernel.space) else kernel.space
            assert set(entry["config"]) == set(space[0]), (name, entry)
            assert all(v == tuning.size_bucket(v) for v in entry["sizes"].values()), entry
            if kernel.shared is not None:
                assert kernel.shared(entry["config"], entry["match"]) <= H100_SHARED, entry


def test_size_buckets_are_powers_of_two():
    assert [tuning.size_bucket(n) for n in (0, 1, 2, 3, 4, 5, 4096, 4097)] == [1, 1, 2, 4, 4, 8, 4096, 8192]


def test_lookup_takes_the_exact_key_else_the_nearest_bucket():
    table = tuning.Table("no-such-gpu")
    match = dict(dtype="bf16", D=128, causal=False)
    small, large = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2), dict(BLOCK_M=128, BLOCK_N=128,
                                                                                  num_warps=8, num_stages=3)
    table.add("gated_attention_fwd", dict(match=match, sizes=dict(L=512, S=512), config=small))
    table.add("gated_attention_fwd", dict(match=match, sizes=dict(L=8192, S=8192), config=large))
    lookup = ga.FWD._lookup
    assert lookup(table, match, dict(L=512, S=512)) == small
    assert lookup(table, match, dict(L=1024, S=1024)) == small
    assert lookup(table, match, dict(L=4096, S=4096)) == large
    assert lookup(table, match, dict(L=16384, S=16384)) == large
    assert lookup(table, dict(match, causal=True), dict(L=512, S=512)) is None


@pytest.mark.parametrize("limit", [H100_SHARED, 99 * 1024, 48 * 1024], ids=["sm90", "sm86", "48KB"])
@pytest.mark.parametrize("kernel", [ga.FWD, ga.BWD, ga.DQ], ids=lambda k: k.name)
def test_heuristics_fit_the_shared_memory(kernel, limit):
    floor = dict(BLOCK_M=16, BLOCK_N=16, num_stages=1)
    for match in ATTENTION_KEYS:
        config = kernel.heuristic_config(match, limit)
        at_floor = all(config[k] == v for k, v in floor.items())
        assert kernel.shared(config, match) <= limit or at_floor, (match, config)
        if limit == H100_SHARED:  # on the H100 every dtype and head dim fits
            assert kernel.shared(config, match) <= limit, (match, config)


class OutOfResources(Exception):  # what Triton raises when a config needs more than the GPU has
    pass


def test_a_config_that_does_not_fit_falls_back_to_the_smallest(monkeypatch):
    monkeypatch.setattr(tuning, "table_for", lambda device: tuning.Table("no-such-gpu"))
    monkeypatch.setattr(tuning, "_shared_memory_bytes", lambda device: None)
    configs = tuning.KernelConfigs("test_kernel", space=[dict(BLOCK_M=128)], heuristic=lambda m: dict(BLOCK_M=128),
                                   smallest=lambda m: dict(BLOCK_M=16))
    launched = []

    def run(config):
        launched.append(config["BLOCK_M"])
        if config["BLOCK_M"] > 16:
            raise OutOfResources("shared memory")

    device = torch.device("cuda", 0)
    configs.launch(run, device, dict(dtype="bf16"), dict(L=100))
    configs.launch(run, device, dict(dtype="bf16"), dict(L=120))  # same bucket: remembered, no retry
    assert launched == [128, 16, 16]
    with pytest.raises(ValueError):  # any other error is the caller's
        configs.launch(lambda config: (_ for _ in ()).throw(ValueError("bad")), device, dict(dtype="fp32"))


def test_tuning_times_the_space_keeps_the_fastest_and_writes_the_table(tmp_path, monkeypatch):
    """MUSETALK_FAST_AUTOTUNE=1 with a stand-in timer (no GPU here): every config of the space is
    timed once per key, the fastest is used and recorded, and the table file gets it."""
    import triton.testing

    monkeypatch.setenv(tuning.AUTOTUNE_ENV, "1")
    monkeypatch.setattr(tuning, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(tuning, "_tables", {})
    monkeypatch.setattr(tuning, "gpu_name", lambda device=None: "Test_GPU")
    speed = {32: 3.0, 64: 1.0, 128: 2.0}  # ms per BLOCK_M
    timed = []

    def fake_do_bench(fn, **kwargs):
        fn()
        return speed[timed[-1]]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    configs = tuning.KernelConfigs("test_kernel", space=[dict(BLOCK_M=m, num_warps=4) for m in speed],
                                   heuristic=lambda m: dict(BLOCK_M=128, num_warps=4),
                                   smallest=lambda m: dict(BLOCK_M=16, num_warps=4))
    configs.launch(lambda config: timed.append(config["BLOCK_M"]), torch.device("cuda", 0), dict(dtype="bf16"),
                   dict(L=1000))
    assert timed == [32, 32, 64, 64, 128, 128, 64]  # each config compiled (its spills read) and timed, then the fastest
    (path,) = tuning.write_tuned_tables()
    assert path == tmp_path / "Test_GPU.json" and not list(tmp_path.glob("*.tmp"))  # written through a rename
    (entry,) = json.loads(path.read_text())["kernels"]["test_kernel"]
    assert entry["config"] == dict(BLOCK_M=64, num_warps=4) and entry["sizes"] == dict(L=1024) and entry["ms"] == 1.0


def test_tuning_never_times_nor_ships_a_config_that_spills(tmp_path, monkeypatch):
    """A config whose compiled kernel reports local memory (Triton's n_spills) is skipped, even if it
    would be the fastest; the table entry says how many were."""
    import types

    import triton.testing

    monkeypatch.setenv(tuning.AUTOTUNE_ENV, "1")
    monkeypatch.setattr(tuning, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(tuning, "_tables", {})
    monkeypatch.setattr(tuning, "gpu_name", lambda device=None: "Test_GPU")
    speed = {32: 3.0, 64: 1.0, 128: 2.0}  # ms per BLOCK_M; the fastest, 64, spills
    timed = []

    def fake_do_bench(fn, **kwargs):
        fn()
        return speed[timed[-1]]

    def run(config):
        timed.append(config["BLOCK_M"])
        return types.SimpleNamespace(n_spills=12 if config["BLOCK_M"] == 64 else 0)  # a CompiledKernel stand-in

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    configs = tuning.KernelConfigs("test_kernel", space=[dict(BLOCK_M=m, num_warps=4) for m in speed],
                                   heuristic=lambda m: dict(BLOCK_M=128, num_warps=4),
                                   smallest=lambda m: dict(BLOCK_M=16, num_warps=4))
    configs.launch(run, torch.device("cuda", 0), dict(dtype="bf16"), dict(L=1000))
    assert timed == [32, 32, 64, 128, 128, 128]  # 64 compiled once, never timed; 128 (the fastest left) launched
    ((kernel, entry),) = tuning.tuned_entries()
    assert kernel == "test_kernel" and entry["config"] == dict(BLOCK_M=128, num_warps=4) and "1 skipped" in entry["from"]


def test_sinkhorn_search_space_scales_with_n():
    for n in (2, 4, 8, 16):
        space = sk.FWD.space(dict(dtype="fp32", n=n))
        values_per_program = {c["BLOCK_B"] * n * n for c in space}
        assert (min(values_per_program), max(values_per_program)) == (512, 4096), (n, values_per_program)


def test_tune_writes_the_table_after_each_case_and_stops_starting_cases_past_its_seconds(monkeypatch):
    """bench/tune.py on a time-capped machine: each finished case is in the table file at once, and past
    --seconds the cases not started are returned (and printed), not run."""
    import types

    from musetalk_fast.bench import tune

    ran, writes, now = [], [], [0.0]

    def case(name, cost):
        def run():
            ran.append(name)
            now[0] += cost
        return types.SimpleNamespace(op=name, shape="s", ours={"ours": run})

    monkeypatch.setattr(tuning, "write_tuned_tables", lambda: writes.append(list(ran)) or [])
    cases = [case("a", 5.0), case("b", 5.0), case("c", 5.0), case("d", 5.0)]
    left = tune.tune_cases(cases, seconds=7.0, clock=lambda: now[0])
    assert ran == ["a", "b"] and left == [("c", "s"), ("d", "s")]
    assert writes == [["a"], ["a", "b"]]  # after every case
    ran.clear()
    assert tune.tune_cases(cases, seconds=None, clock=lambda: now[0]) == [] and ran == ["a", "b", "c", "d"]


def test_importing_the_tuner_leaves_tuning_off(monkeypatch):
    """bench/tune.py turns tuning on in its main() only: an import (as the test above does) must not set
    MUSETALK_FAST_AUTOTUNE=1 for the rest of the process, where on a GPU every later launch would time its
    whole search space at each new key (e.g. the trainer tests that follow in the same pytest process)."""
    import importlib

    from musetalk_fast.bench import tune

    monkeypatch.setenv(tuning.AUTOTUNE_ENV, "0")
    importlib.reload(tune)
    assert os.environ[tuning.AUTOTUNE_ENV] == "0" and not tuning.tuning_enabled()
