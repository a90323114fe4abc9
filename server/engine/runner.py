"""The model side of the engine: device, KV cache, vision encoding, preparing prompts, prefill
chunks, one batched decode forward per step, and sampling. It reads the scheduler's block tables
and positions and never writes them. Runs on the engine thread (`encode` on the vision thread)."""

from __future__ import annotations

import logging
import time

import torch

from model.config import IMAGE_TOKEN_INDEX
from model.decode_graphs import DecodeGraphs
from model.kv_cache import KVCache
from model.loading import LoadedModel
from model.modeling import ImageFeatures, ImageReport
from model.grammar import GrammarCompiler, GrammarError, Matcher, apply_masks, shared_compiler
from model.sampling import SequenceSampler, TokenLogprob, sample

from .sequence import SequenceState
from .vision import without_pixels
from .vision_cache import CacheMiss, VisionCache

log = logging.getLogger(__name__)


# On the CPU, where the pool is host memory beside the weights, the default holds this many
# sequences of max_model_len (most requests are shorter: more run at once), at most 4 GiB
# (vLLM's CPU backend defaults to 4 GiB as well); --kv-cache-mb sets it.
CPU_KV_SEQUENCES = 16
CPU_KV_CACHE_CAP = 4 << 30
# On CUDA the pool takes this share of the memory left free after loading the weights; the rest
# is for activations, the vision tower and CUDA graphs.
CUDA_KV_SHARE = 0.8


def kv_cache_blocks(kv_cache_bytes: int | None, *, block_size: int, bytes_per_token: int, max_model_len: int,
                    device: torch.device, decode_scratch: int = 0) -> int:
    """Blocks in the pool (the null block included): `kv_cache_bytes` if given; by default on
    CUDA a share of the free memory once `decode_scratch` bytes are set aside (what a decode step
    gathers at most), elsewhere CPU_KV_SEQUENCES sequences of `max_model_len` positions, up to
    CPU_KV_CACHE_CAP but never less than one sequence."""
    block_bytes = bytes_per_token * block_size
    one_sequence = -(-max_model_len // block_size) * block_bytes
    if kv_cache_bytes is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            kv_cache_bytes = int(max(0, free - decode_scratch) * CUDA_KV_SHARE)
        else:
            kv_cache_bytes = max(min(CPU_KV_SEQUENCES * one_sequence, CPU_KV_CACHE_CAP), one_sequence)
    blocks = kv_cache_bytes // block_bytes
    if blocks < -(-max_model_len // block_size):
        raise RuntimeError(f"a KV cache of {kv_cache_bytes / 2**20:.0f} MiB holds {blocks * block_size} positions, "
                           f"fewer than one sequence of --max-model-len {max_model_len} "
                           f"({bytes_per_token} bytes a position): raise --kv-cache-mb or lower --max-model-len")
    return blocks + 1


class PromptTooLong(ValueError):
    """Known only once the images' kept tokens are: the request cannot run as asked."""


def position_keys(input_ids: list[int], digests: list[str | None], reports: list[ImageReport],
                  prompt_len: int) -> list | None:
    """What each prompt position holds, for the prefix cache: the token id, or for an image row
    (image digest, kept-token selection, row). An image without a digest leaves its rows
    unidentified (None). None if the rows do not add up to the prompt (then nothing is shared)."""
    keys: list = []
    images = iter(zip(digests, reports))
    for t in input_ids:
        if t != IMAGE_TOKEN_INDEX:
            keys.append(t)
            continue
        digest, report = next(images)
        keys += [(digest, report.selection, j) if digest else None for j in range(report.rows)]
    return keys if len(keys) == prompt_len else None


class RunnerState:
    """Per-sequence runner state: how it samples, and what its images became."""

    def __init__(self, sampler: SequenceSampler, images: list[ImageReport], matcher: Matcher | None = None):
        self.sampler = sampler
        self.images = images  # one report per image: rows, kept local tokens
        self.matcher = matcher  # structured output: where the sequence is in its grammar


class ModelRunner:
    def __init__(self, lm: LoadedModel, *, max_batch_size: int, max_model_len: int, kv_cache_bytes: int | None = None,
                 block_size: int = 16, vision_cache_bytes: int = 0, cuda_graphs: bool = True,
                 capture_all_graphs: bool = False, compile_pointwise: bool = True, vision_queue_bytes: int = 0):
        self.lm = lm
        self.model = lm.model
        self.llm = lm.model.llm
        self.device = lm.device
        cfg = lm.cfg
        self.max_model_len = max_model_len
        self.max_batch_size = max_batch_size
        per_token = KVCache.bytes_per_token(num_layers=cfg.num_hidden_layers, num_kv_heads=cfg.num_key_value_heads,
                                            head_dim=cfg.dim_head, dtype=lm.dtype)
        # the sdpa backend gathers each sequence's K and V of one layer at a time ([Hkv, B, span,
        # hd] x 2; the others read the blocks in place); image features waiting for their
        # requests to start live beside the pool too
        execution = self.llm.execution
        if execution.block_size(block_size) != block_size:  # flash-attn's paged path: multiples of 256
            block_size = execution.block_size(block_size)
            log.info("the %s attention backend takes KV-cache blocks of %d positions", execution.attention, block_size)
        scratch = (max_batch_size * max_model_len * per_token // cfg.num_hidden_layers if execution.gathers else 0) \
            + vision_queue_bytes
        num_blocks = kv_cache_blocks(kv_cache_bytes, block_size=block_size, bytes_per_token=per_token,
                                     max_model_len=max_model_len, device=lm.device, decode_scratch=scratch)
        self.cache = self.llm.new_cache(num_blocks=num_blocks, block_size=block_size, dtype=lm.dtype, device=lm.device)
        log.info("KV cache: %d blocks of %d positions (%.0f MiB, %d positions)", num_blocks - 1, block_size,
                 self.cache.nbytes / 2**20, self.cache.max_len)
        # CUDA graphs for decode where the execution allows them (not bitsandbytes layers, whose
        # kernels are not known to be capturable)
        graphs = cuda_graphs and execution.cuda_graphs
        self.graphs = DecodeGraphs(self.llm, self.cache, max_batch=max_batch_size, max_len=max_model_len) if graphs else None
        self.capture_all_graphs = capture_all_graphs
        if compile_pointwise and lm.device.type == "cuda":
            self.llm.compile_pointwise()  # compiled in warm_up
        self.eos = set(lm.eos_token_ids)
        self.vision_cache = VisionCache(vision_cache_bytes) if vision_cache_bytes > 0 else None
        self.vocab = cfg.vocab_size
        self._grammars: GrammarCompiler | None = None

    @property
    def num_blocks(self) -> int:
        return self.cache.num_blocks

    @property
    def block_size(self) -> int:
        return self.cache.block_size

    def warm_up(self) -> None:
        """Prefill and decode once before serving: lazy initialisation, compiling the pointwise
        kernels and capturing the first decode graphs happen here, not in a request. Where
        compiling fails the kernels run eagerly; where capturing fails decoding runs without graphs.
        The structured-output compiler (its view of the vocabulary) is built and used for one
        mask here too."""
        self.grammars.warm_up()
        self._warm_up_attention()
        try:
            self._warm_up()
        except Exception:
            if not self.llm.kernels.compiled:
                raise
            log.exception("compiling the pointwise kernels failed: running them eagerly")
            self.llm.compile_pointwise(False)
            self._warm_up()

    def _warm_up_attention(self) -> None:
        """A paged kernel that fails its warm-up where `auto` chose it gives way to the next one
        (flash -> triton -> sdpa); asked for by name, its failure is the operator's to see."""
        from model import paged_attention_triton

        while (failed := self.llm.attention_backend) in ("triton", "flash"):
            try:
                self._warm_up_paged()
                return
            except Exception:
                if not self.llm.execution.auto:
                    raise
                fallback = "triton" if failed == "flash" and paged_attention_triton.available() else "sdpa"
                log.exception("the %s attention kernel failed its warm-up: attending through %s%s", failed, fallback,
                              "" if fallback == "triton" else " (the KV cache was sized without room for the "
                              "gather: lower --kv-cache-mb if decode runs out of memory)")
                self.llm.set_attention_backend(fallback)
                if self.graphs is not None:
                    self.graphs = DecodeGraphs(self.llm, self.cache, max_batch=self.max_batch_size,
                                               max_len=self.max_model_len)

    @torch.inference_mode()
    def _warm_up_paged(self) -> None:
        """The paged attention kernel run at the longest span, reading block 1 (scratch before
        serving) of layer 0 only, so that a failure here is the kernel's: both Triton kernels
        compiled as decode runs them (one split, and split-K with its merge; writing the new K/V),
        or flash-attn's decode and chunk shapes."""
        from model import paged_attention_flash, paged_attention_triton

        cfg, cache = self.lm.cfg, self.cache
        q = torch.zeros(1, cfg.num_attention_heads, cfg.dim_head, dtype=cache.k.dtype, device=self.device)
        width = -(-min(self.max_model_len, cache.max_len) // cache.block_size)
        tables = torch.ones(1, width, dtype=torch.long, device=self.device)
        lengths = torch.tensor([width * cache.block_size], device=self.device)
        if self.llm.attention_backend == "flash":
            for queries in (1, 2):  # decode, and a prompt chunk over the cache
                paged_attention_flash.attend(q.unsqueeze(1).expand(1, queries, -1, -1).contiguous(), cache.k[0],
                                             cache.v[0], tables.int(), lengths.int())
            return
        new = torch.zeros(1, cfg.num_key_value_heads, cfg.dim_head, dtype=cache.k.dtype, device=self.device)
        for splits in (1, 2):  # the variant decode runs: it writes the new K/V (into scratch block 1 here)
            paged_attention_triton.paged_decode(q, cache.k[0], cache.v[0], tables, lengths, splits=splits,
                                                k_new=new, v_new=new)

    @torch.inference_mode()
    def _warm_up(self) -> None:
        # Before serving no block is anyone's: block 1 is scratch here.
        emb = self.llm.embed(torch.tensor([0, 0, 0], device=self.device))
        self.llm.prefill(emb[:2], self.cache, start=0, table=[1])
        self.llm.prefill(emb[2:], self.cache, start=2, table=[1])  # a one-position chunk: its own shape
        batches = sorted({1, min(2, self.max_batch_size)})  # batch 1 and dynamic batches compile apart
        for batch in batches:
            ids = torch.zeros(batch, dtype=torch.long, device=self.device)  # contiguous, as in serving
            self.llm.decode(self.llm.embed(ids), [3] * batch, self.cache, [[1]] * batch)
        if self.graphs is not None:
            try:
                for batch in batches:
                    self.graphs([0] * batch, [3] * batch, [[1]] * batch)
                if self.graphs.eager_shapes:  # capturing fails here at all: not worth trying per shape
                    raise RuntimeError(f"capturing {sorted(self.graphs.eager_shapes)} failed")
                if self.capture_all_graphs:
                    t0 = time.perf_counter()
                    n = self.graphs.capture_all()
                    log.info("captured %d decode graphs in %.1fs", n, time.perf_counter() - t0)
            except RuntimeError:
                log.exception("CUDA graph capture failed: decoding without graphs")
                self.graphs = None

    # -- prefill ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, images: list) -> list[ImageFeatures]:
        """One request's images -> their features (see `encode_many`)."""
        return self.encode_many([images])[0]

    @torch.inference_mode()
    def encode_many(self, requests: list[list]) -> list[list[ImageFeatures]]:
        """Vision stage (its own thread): CLIP and both adapters for the images of several requests
        not in the cache, all their views as one batch (an image two of them share, once). Each
        request's features are what encoding it alone gives. Touches only the vision modules,
        never the KV cache."""
        feats: list[list[ImageFeatures | None]] = [[None] * len(images) for images in requests]
        todo: dict[str, list[tuple[int, int]]] = {}  # one encoding per digest (or per unnamed image)
        for r, images in enumerate(requests):
            for i, img in enumerate(images):
                if img.pixels is None:  # the chat layer found it in the cache
                    hit = self.vision_cache.take(img.digest) if self.vision_cache else None
                    if hit is None:
                        raise CacheMiss("cached image features were evicted; retry the request")
                    feats[r][i] = hit
                elif img.digest and self.vision_cache and (seen := self.vision_cache.peek(img.digest)) is not None:
                    feats[r][i] = seen  # encoded moments ago (another choice of the same request, or the same upload)
                else:
                    todo.setdefault(img.digest or f"#{r}.{i}", []).append((r, i))
        if todo:
            first = [places[0] for places in todo.values()]
            new = self.model.encode_images([torch.from_numpy(requests[r][i].pixels) for r, i in first],
                                           [requests[r][i].grid for r, i in first])
            for places, f in zip(todo.values(), new):
                for r, i in places:
                    feats[r][i] = f
                r, i = places[0]
                if self.vision_cache and requests[r][i].digest:
                    self.vision_cache.put(requests[r][i].digest, f)
        return feats  # type: ignore[return-value]

    @torch.inference_mode()
    def prepare(self, seq: SequenceState, like: SequenceState | None = None) -> float | None:
        """Before a sequence is first scheduled: image-token selection and the prompt's embeddings
        `[T, D]` (a text prompt is embedded chunk by chunk instead: nothing held while it waits),
        its exact length and the sampling state. `like`: another choice of the same request,
        prepared, whose prompt it shares. -> seconds spent encoding images here (no vision thread)."""
        req, seconds = seq.request, None
        if like is not None:
            seq.embeds, seq.prompt_len, seq.position_keys = like.embeds, like.prompt_len, like.position_keys
            reports = like.state.images
        elif req.images:
            feats = req.features
            if feats is None:  # no vision thread: encode here
                t0 = time.perf_counter()
                feats = self.encode(req.images)
                seconds = time.perf_counter() - t0
            seq.embeds, reports = self.model.embed_prompt(req.input_ids, feats,
                                                          slime_selection=req.slime_selection)  # [T, D]
            seq.prompt_len = seq.embeds.shape[0]
        else:
            seq.prompt_len, reports = len(req.input_ids), []
        req.features = None
        req.images = without_pixels(req.images)  # the digests stay (prefix keys); the pixels are done with
        if like is None:
            seq.position_keys = position_keys(req.input_ids, [img.digest for img in req.images], reports,
                                              seq.prompt_len)
        limit = min(self.max_model_len, self.cache.max_len)
        if seq.prompt_len + req.params.max_tokens > limit:
            where = "the context" if limit == self.max_model_len else "the KV cache (--kv-cache-mb)"
            raise PromptTooLong(f"the prompt needs {seq.prompt_len} positions (image rows included) and "
                                f"{req.params.max_tokens} were asked for the completion: more than the "
                                f"{limit} of {where}")
        matcher = self.grammars.matcher(req.params.grammar) if req.params.grammar else None
        seq.state = RunnerState(SequenceSampler(req.params, req.input_ids, self.device), reports, matcher)
        return seconds

    @torch.inference_mode()
    def prefill_chunk(self, seq: SequenceState, start: int, end: int, sample: bool) -> torch.Tensor | None:
        """Run prompt positions [start, end) into the sequence's blocks; `sample`: -> the logits
        `[1, V]` of the last one (for the first token)."""
        if seq.embeds is not None:
            x = seq.embeds[start:end]  # [n, D]
        else:
            x = self.llm.embed(torch.tensor(seq.request.input_ids[start:end], device=self.device))
        hidden = self.llm.prefill(x, self.cache, start=start, table=seq.blocks)
        return self.llm.logits(hidden.unsqueeze(0)) if sample else None

    @torch.inference_mode()
    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy on write: the K/V of block src into block dst, for each pair."""
        if copies:
            src, dst = (torch.tensor(x, device=self.device) for x in zip(*copies))
            self.cache.copy_blocks(src, dst)

    # -- decode ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, seqs: list[SequenceState]) -> torch.Tensor:
        """One batched forward: each sequence feeds the token at its next uncomputed position (its
        last token; an earlier one while it replays after preemption) -> logits `[B, V]`."""
        positions = [s.computed for s in seqs]
        ids = [s.token_at(p) for s, p in zip(seqs, positions)]
        tables = [s.blocks for s in seqs]
        if self.graphs is not None:
            return self.graphs(ids, positions, tables)  # [B, V]
        hidden = self.llm.decode(self.llm.embed(torch.tensor(ids, device=self.device)), positions, self.cache, tables)
        return self.llm.logits(hidden)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, seqs: list[SequenceState]) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits `[B, V]` -> one token per sequence (advances seeded generators and penalty counts).
        Sequences with a grammar draw only tokens it allows (masked in one batched op)."""
        matchers = [s.state.matcher for s in seqs]
        if any(m is not None for m in matchers):
            logits = apply_masks(logits.clone(), matchers)
        return sample(logits, [s.state.sampler for s in seqs])

    @property
    def grammars(self) -> GrammarCompiler:
        """The structured-output compiler for this model's tokenizer (this process's, shared with
        request preparation; built at first use)."""
        if self._grammars is None:
            self._grammars = shared_compiler(self.lm.tokenizer, self.vocab)
        return self._grammars

    def compile_grammar(self, request) -> None:
        """Compile a request's grammar now, on the calling thread (not the engine's), unless this
        process has it already; an error is left for the request's start to report."""
        if request.params.grammar is not None:
            try:
                self.grammars.compile(request.params.grammar)
            except GrammarError:
                pass

    @staticmethod
    def rng_states(seqs: list[SequenceState]) -> list:
        """The sampled sequences' generator states (~5 KB each on the CPU), to sample a step again
        after a failure as if the failed attempt never ran."""
        return [None if s.state.sampler.generator is None else s.state.sampler.generator.get_state() for s in seqs]

    @staticmethod
    def restore_rng_states(seqs: list[SequenceState], states: list) -> None:
        for s, state in zip(seqs, states):
            if state is not None:
                s.state.sampler.generator.set_state(state)
