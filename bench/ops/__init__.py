"""One module per op family; each exposes cases(device) -> list[bench.case.Case]."""
