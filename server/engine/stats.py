"""Filling in the engine's per-step report (`types.EngineStats`): the gauges read at the end of
a step, and what a prepared request's images came to."""

from __future__ import annotations

from .types import EngineStats


class StepStats:
    @staticmethod
    def gauges(stats: EngineStats, scheduler, runner, vision) -> EngineStats:
        """`stats` (a step's observations) with the gauges as of now; the scheduler's counters
        are taken (reset to 0)."""
        pool = scheduler.pool
        stats.running = scheduler.num_running
        stats.waiting = len(scheduler.waiting) + (vision.pending if vision else 0)
        stats.kv_usage = pool.num_used / pool.capacity
        stats.kv_cached_blocks = pool.num_cached
        stats.kv_blocks, stats.kv_block_size = pool.capacity, scheduler.block_size
        stats.preemptions, scheduler.preempted = scheduler.preempted, 0
        stats.prefix_queried_tokens, scheduler.prefix_queried = scheduler.prefix_queried, 0
        stats.prefix_hit_tokens, scheduler.prefix_hits = scheduler.prefix_hits, 0
        stats.cuda_graphs = runner.graphs.num_graphs if runner.graphs else 0
        stats.attention_backend = runner.llm.attention_backend
        if vision is not None:
            stats.vision_features_bytes = vision.budget.held
            vision.budget.notify()  # a step may have started requests that held features
        return stats

    @staticmethod
    def images(stats: EngineStats, reports: list, vision_seconds: float | None) -> None:
        """A prepared request's image tokens by kind (and its encoding time, when encoded inline)."""
        if vision_seconds is not None:
            stats.vision_seconds.append(vision_seconds)
        tokens = stats.image_tokens
        for r in reports:
            tokens["global"] = tokens.get("global", 0) + r.global_tokens
            tokens["local_total"] = tokens.get("local_total", 0) + r.local_tokens
            tokens["local_kept"] = tokens.get("local_kept", 0) + r.local_kept
