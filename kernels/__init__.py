"""Triton kernels and their launchers (installed as musetalk_fast.kernels)."""
