"""Choices and defaults that the CLI, the Python API and `build` share, declared once. Imports nothing (the
CLI reads it at start-up, before torch loads)."""

from __future__ import annotations

# Scale search: alphas 0, 1/grid, ..., (grid-1)/grid (AutoAWQ's grid of 20), and how many of them per scale
# group (the best by reconstruction) the task-aware search scores with the task loss.
SEARCH_GRID = 20
TASK_TOPK = 3
# `--fast`: fewer scale candidates and task-aware trials (the trials dominate the time on VGGT-1B).
FAST_PRESET = {"grid": 10, "task_topk": 2}


def fast_preset_help() -> str:
    return f"grid {FAST_PRESET['grid']} alphas, top-{FAST_PRESET['task_topk']} task-aware candidates"
