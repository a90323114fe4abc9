"""The decode step as CUDA graphs: one graph per (batch bucket, key-span bucket), captured all at
once before serving (`capture_all`) or each on first use, and replayed with new token ids and
positions.

A 7B decode step launches hundreds of small kernels: 11 ops per layer (32 layers) with the
compiled pointwise kernels, 16 with the eager ones (see `model.pointwise`); `python -m bench.gpu
--profile` measures the device ops of a step (457 for a compiled batch-1 step, BENCHMARKS.md).
From Python each launch costs more than the kernel itself at small batches, so eager decode
reaches a fraction of the memory-bandwidth roofline. A replayed graph launches them all at once.

Shapes are fixed per graph: the batch is padded up to a bucket (1, 2, 4, 8, then multiples of 8)
and the keys each row reads up to a multiple of `span_block` (the rest masked); block tables are
a static `[max_batch, max_len / block_size]` buffer. Padding rows feed token 0 at position 0 with
an all-null table, so they write only to the null block, never to a live sequence's blocks. Without CUDA (or with `use_graphs=False`) the same static step runs
eagerly, which is what the CPU tests check against `LlamaForCausalLM.decode`.
"""

from __future__ import annotations

import logging

import torch

from .kv_cache import NULL_BLOCK, KVCache
from .llm import LlamaForCausalLM

log = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes graphs are captured for: 1, 2, 4, 8, 16, 24, 32, ... up to and with max_batch."""
    sizes = [s for s in (1, 2, 4) if s < max_batch] + list(range(8, max_batch, 8))
    return sorted(set(sizes) | {max_batch})


class DecodeGraphs:
    """Batched decode of up to `max_batch` sequences of at most `max_len` positions over `cache`."""

    def __init__(self, llm: LlamaForCausalLM, cache: KVCache, *, max_batch: int, max_len: int, span_block: int = 256,
                 use_graphs: bool | None = None):
        if span_block % cache.block_size:
            raise ValueError(f"span_block {span_block} is not a multiple of the block size {cache.block_size}")
        self.llm = llm
        self.cache = cache
        self.device = cache.k.device
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        self.max_batch = max_batch
        self.max_len = -(-max_len // cache.block_size) * cache.block_size
        self.buckets = batch_buckets(self.max_batch)
        self.span_block = span_block
        n = self.buckets[-1]
        # Static inputs every graph reads (a graph replays on fixed addresses): token ids and
        # positions, and block tables, each sent in one copy per step.
        self._inputs = torch.zeros(2, n, dtype=torch.long, device=self.device)
        self.ids, self.positions = self._inputs
        self.tables = torch.zeros(n, self.max_len // cache.block_size, dtype=torch.long, device=self.device)
        # One output buffer for all graphs (each graph copies its logits there), so that the graphs'
        # own allocations can all come from, and be reused within, one shared memory pool.
        self.logits = torch.zeros(n, llm.cfg.vocab_size, dtype=torch.float32, device=self.device)
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        # Shapes whose capture failed while serving: they run eagerly from then on (a capture
        # failure is the graph's, never the batch's; it is not retried on every call).
        self.eager_shapes: set[tuple[int, int]] = set()
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        llm.rope_tables(self.max_len, self.device)  # built now, never inside a capture

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def bucket(self, batch: int) -> int:
        return next(b for b in self.buckets if b >= batch)

    def shapes(self) -> list[tuple[int, int]]:
        """Every (batch bucket, key span) a call can need."""
        top = self.max_len
        spans = [min(s, top) for s in range(self.span_block, top + self.span_block, self.span_block)]
        return [(b, s) for b in self.buckets for s in spans]

    @torch.inference_mode()
    def capture_all(self) -> int:
        """Capture every graph now (before serving), so that no request waits for a capture later.
        Returns how many were captured (0 without graphs)."""
        if not self.use_graphs:
            return 0
        todo = [shape for shape in self.shapes() if shape not in self._graphs]
        for nb, span in todo:
            self._capture(nb, span)
        return len(todo)

    def span(self, positions: list[int]) -> int:
        return min(-(-(max(positions) + 1) // self.span_block) * self.span_block, self.max_len)

    @torch.inference_mode()
    def __call__(self, ids: list[int], positions: list[int], tables: list[list[int]]) -> torch.Tensor:
        """Row i feeds token ids[i] at positions[i] through block table tables[i] -> float32 logits
        `[B, V]`.

        The result is a view of the graph's output buffer: read it before the next call."""
        b = len(ids)
        if not 0 < b <= self.max_batch or len(positions) != b or len(tables) != b:
            raise ValueError(f"decode batch of {b} (max {self.max_batch})")
        if max(positions) >= self.max_len:
            raise ValueError(f"position {max(positions)} past the {self.max_len} positions graphs were made for")
        nb, span = self.bucket(b), self.span(positions)
        pad = nb - b
        self._inputs[:, :nb].copy_(torch.tensor([ids + [0] * pad, positions + [0] * pad]))
        self.tables[:nb].copy_(self.cache.tables(list(tables) + [[]] * pad, self.max_len))
        graph = self._graph(nb, span) if self.use_graphs else None
        if graph is None:
            self._step(nb, span)
        else:
            graph.replay()
        return self.logits[:b]

    def _graph(self, nb: int, span: int) -> torch.cuda.CUDAGraph | None:
        """The shape's graph, captured now if it is new; None where capturing it failed."""
        graph = self._graphs.get((nb, span))
        if graph is not None or (nb, span) in self.eager_shapes:
            return graph
        try:
            return self._capture(nb, span)
        except Exception:  # noqa: BLE001 - e.g. out of memory for the graph's pool: run it eagerly
            log.exception("capturing the decode graph for batch %d, span %d failed: that shape runs eagerly",
                          nb, span)
            self.eager_shapes.add((nb, span))
            return None

    def _step(self, nb: int, span: int) -> None:
        cols = span // self.cache.block_size
        self.logits[:nb].copy_(self.llm.decode_static(self.ids[:nb], self.positions[:nb], self.tables[:nb, :cols],
                                                      self.cache))

    def _capture(self, nb: int, span: int) -> torch.cuda.CUDAGraph:
        # Warm-up and capture write K/V: point every row at the null block meanwhile (and the
        # live tables back in place however the capture ends).
        live = self.tables[:nb].clone()
        self.tables[:nb] = NULL_BLOCK
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # lets lazy initialisation (cuBLAS workspaces, ...) happen outside the graph
                    self._step(nb, span)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the vision thread may use the GPU while the engine thread captures
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                self._step(nb, span)
        finally:
            self.tables[:nb] = live
        self._graphs[(nb, span)] = graph
        return graph
