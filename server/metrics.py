"""Prometheus collectors, in a registry of their own per app (tests run several apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_GAP = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self, model_name: str = "") -> None:
        r = self.registry = CollectorRegistry()
        self.model_name = model_name
        self.requests = Counter("slime_requests", "Finished chat requests", ["status", "finish_reason"], registry=r)
        self.errors = Counter("slime_errors", "Error responses by type and status", ["type", "status"], registry=r)
        self.ttft = Histogram("slime_time_to_first_token_seconds", "Arrival to first token", buckets=_LATENCY,
                              registry=r)
        self.itl = Histogram("slime_inter_token_latency_seconds", "Gap between tokens of a request",
                             buckets=_TOKEN_GAP, registry=r)
        self.e2e = Histogram("slime_e2e_request_latency_seconds", "Arrival to last token", buckets=_LATENCY,
                             registry=r)
        self.queue_time = Histogram("slime_queue_time_seconds", "Arrival to start of prefill", buckets=_LATENCY,
                                    registry=r)
        self.prompt_tokens = Counter("slime_prompt_tokens", "Prompt positions fed to the LLM", registry=r)
        self.generation_tokens = Counter("slime_generation_tokens", "Generated tokens", registry=r)
        self.running = Gauge("slime_num_requests_running", "Requests running (holding KV-cache blocks)", registry=r)
        self.waiting = Gauge("slime_num_requests_waiting", "Requests waiting to run (preempted ones included)",
                             registry=r)
        self.kv_usage = Gauge("slime_kv_cache_usage_ratio", "Share of KV-cache blocks in use", registry=r)
        self.kv_cached = Gauge("slime_kv_cache_cached_blocks", "KV-cache blocks a later prompt can reuse",
                               registry=r)
        self.prefix_queried = Counter("slime_prefix_cache_queried_tokens", "Prompt positions looked up in the "
                                      "prefix cache", registry=r)
        self.prefix_hits = Counter("slime_prefix_cache_hit_tokens", "Prompt positions found in the prefix cache "
                                   "(or shared by the choices of one request): not computed", registry=r)
        self.preemptions = Counter("slime_num_preemptions", "Sequences preempted when KV-cache blocks ran out "
                                   "(computed again later)", registry=r)
        self.vision_features = Gauge("slime_vision_features_bytes", "Encoded image features held by requests "
                                     "that have not started (bounded by --vision-queue-mb)", registry=r)
        self.decode_graphs = Gauge("slime_decode_cuda_graphs", "Decode-step CUDA graphs captured (0: eager decode)",
                                   registry=r)
        self.attention_backend = Gauge("slime_attention_backend_info", "The attention backend in use (value 1): "
                                       "what auto chose, after any warm-up fallback", ["backend"], registry=r)
        self._backend = ""
        self.batch_size = Histogram("slime_batch_size", "Sequences per decode forward",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.preprocess = Histogram("slime_image_preprocess_seconds", "Image decoding and slicing per request",
                                    buckets=_LATENCY, registry=r)
        self.vision = Histogram("slime_vision_encode_seconds", "Vision tower and adapters per request",
                                buckets=_LATENCY, registry=r)
        self.image_tokens = Counter("slime_image_tokens", "SliME image tokens by kind", ["kind"], registry=r)
        self.vision_cache = Counter("slime_vision_cache", "Vision-feature cache lookups", ["result"], registry=r)
        self.images = Counter("slime_images", "Images received", registry=r)
        self._gateway_gauges(model_name)

    def _gateway_gauges(self, model_name: str) -> None:
        """The model-server protocol that gateways read (Gateway API Inference Extension, vLLM's
        router, production-stack): vLLM's names and meanings, beside ours."""
        r, m = self.registry, ["model_name"]
        self.vllm_waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to run", m, registry=r)
        self.vllm_running = Gauge("vllm:num_requests_running", "Requests running (decoding or prefilling)", m,
                                  registry=r)
        self.vllm_kv = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage (1 = full)", m, registry=r)
        self.vllm_gpu_kv = Gauge("vllm:gpu_cache_usage_perc", "KV-cache usage (1 = full); the old name, which "
                                 "vLLM's production-stack router reads", m, registry=r)
        self.vllm_cache_config = Gauge("vllm:cache_config_info", "KV-cache configuration (value 1)",
                                       ["block_size", "num_gpu_blocks"], registry=r)
        self._cache_config: tuple[int, int] | None = None
        for g in (self.vllm_waiting, self.vllm_running, self.vllm_kv, self.vllm_gpu_kv):
            g.labels(model_name)  # exported (0) before the engine's first report

    # -- what the API process observes (the rest comes from the engine, in `observe_engine`) --------
    def error(self, err) -> None:
        """An error answer (server.errors.APIError), also one sent mid-stream."""
        self.errors.labels(err.type, str(err.status)).inc()

    def vision_cache_lookup(self, hit: bool) -> None:
        self.vision_cache.labels("hit" if hit else "miss").inc()

    def images_prepared(self, count: int, seconds: float) -> None:
        self.preprocess.observe(seconds)
        self.images.inc(count)

    def observe_engine(self, stats) -> None:
        """One engine report (server.engine.types.EngineStats), from either engine mode."""
        self.running.set(stats.running)
        self.waiting.set(stats.waiting)
        self.kv_usage.set(stats.kv_usage)
        self.kv_cached.set(stats.kv_cached_blocks)
        name = self.model_name
        self.vllm_waiting.labels(name).set(stats.waiting)
        self.vllm_running.labels(name).set(stats.running)
        self.vllm_kv.labels(name).set(stats.kv_usage)
        self.vllm_gpu_kv.labels(name).set(stats.kv_usage)
        config = (stats.kv_block_size, stats.kv_blocks)
        if stats.kv_blocks and config != self._cache_config:
            if self._cache_config is not None:
                self.vllm_cache_config.remove(*map(str, self._cache_config))
            self.vllm_cache_config.labels(*map(str, config)).set(1)
            self._cache_config = config
        if stats.prefix_queried_tokens:
            self.prefix_queried.inc(stats.prefix_queried_tokens)
            self.prefix_hits.inc(stats.prefix_hit_tokens)
        if stats.preemptions:
            self.preemptions.inc(stats.preemptions)
        self.decode_graphs.set(stats.cuda_graphs)
        if stats.attention_backend and stats.attention_backend != self._backend:
            if self._backend:
                self.attention_backend.remove(self._backend)
            self.attention_backend.labels(stats.attention_backend).set(1)
            self._backend = stats.attention_backend
        self.vision_features.set(stats.vision_features_bytes)
        for hist, values in ((self.ttft, stats.ttft), (self.itl, stats.itl), (self.queue_time, stats.queue_time),
                             (self.vision, stats.vision_seconds), (self.batch_size, stats.batch_sizes)):
            for v in values:
                hist.observe(v)
        for kind, n in stats.image_tokens.items():
            self.image_tokens.labels(kind).inc(n)
        for f in stats.finished:
            self.requests.labels(f.status, f.finish_reason).inc()
            if f.prompt_tokens:
                self.prompt_tokens.inc(f.prompt_tokens)
            self.generation_tokens.inc(f.generation_tokens)
            if f.e2e_seconds is not None:
                self.e2e.observe(f.e2e_seconds)
