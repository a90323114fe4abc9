"""The model side of the engine: device, KV cache, vision encoding, prefill chunks, one batched
decode forward per step, and sampling. Runs on the engine thread (`encode` on the vision thread)."""

from __future__ import annotations

import logging
import time

import torch

from model.decode_graphs import DecodeGraphs
from model.kv_cache import KVCache
from model.loading import LoadedModel
from model.modeling import ImageFeatures, ImageReport
from model.grammar import GrammarCompiler, Matcher, apply_masks
from model.sampling import SequenceSampler, TokenLogprob, sample

from .detokenizer import IncrementalDetokenizer
from .scheduler import SequenceState
from .vision_cache import CacheMiss, VisionCache

log = logging.getLogger(__name__)


def fit_slots(num_slots: int, max_model_len: int, cfg, dtype: torch.dtype, device: torch.device,
              *, headroom: float = 0.8, reserve: int = 0) -> int:
    """Slots that fit in the device's free memory (on CUDA), keeping room for activations and for
    `reserve` slots beside them."""
    if device.type != "cuda":
        return num_slots
    per_slot = KVCache.bytes_per_token(num_layers=cfg.num_hidden_layers, num_kv_heads=cfg.num_key_value_heads,
                                       head_dim=cfg.dim_head, dtype=dtype) * max_model_len
    free, _ = torch.cuda.mem_get_info(device)
    fit = int(free * headroom // per_slot) - reserve
    if fit < 1:
        raise RuntimeError(f"not enough GPU memory for one sequence of {max_model_len} positions "
                           f"({per_slot / 2**30:.1f} GiB); lower --max-model-len or quantize")
    if fit < num_slots:
        log.warning("KV cache: %d slots of %d positions fit in free GPU memory (asked for %d)", fit,
                    max_model_len, num_slots)
    return min(num_slots, fit)


class PromptTooLong(ValueError):
    """Known only once the images' kept tokens are: the request cannot run as asked."""


class SeqState:
    """Per-sequence runner state."""

    def __init__(self, sampler: SequenceSampler, detok: IncrementalDetokenizer, matcher: Matcher | None = None):
        self.sampler = sampler
        self.detok = detok
        self.matcher = matcher  # structured output: where the sequence is in its grammar
        self.images: list[ImageReport] = []


class ModelRunner:
    def __init__(self, lm: LoadedModel, *, num_slots: int, max_model_len: int, vision_cache_bytes: int = 0,
                 cuda_graphs: bool = True, capture_all_graphs: bool = False, compile_pointwise: bool = True):
        self.lm = lm
        self.model = lm.model
        self.llm = lm.model.llm
        self.device = lm.device
        cfg = lm.cfg
        self.max_model_len = max_model_len
        # CUDA graphs for decode (not for bitsandbytes layers, whose kernels are not known to be capturable)
        graphs = cuda_graphs and lm.device.type == "cuda" and lm.quantization == "none"
        scratch = 1 if graphs else 0  # DecodeGraphs' padding rows write to one extra slot
        num_slots = fit_slots(num_slots, max_model_len, cfg, lm.dtype, lm.device, reserve=scratch)
        self.num_slots = num_slots
        self.cache = self.llm.new_cache(num_slots=num_slots + scratch, max_len=max_model_len, dtype=lm.dtype,
                                        device=lm.device)
        self.graphs = DecodeGraphs(self.llm, self.cache) if graphs else None
        self.capture_all_graphs = capture_all_graphs
        if compile_pointwise and lm.device.type == "cuda":
            self.llm.compile_pointwise()  # compiled in warm_up
        self.eos = set(lm.eos_token_ids)
        self.vision_cache = VisionCache(vision_cache_bytes) if vision_cache_bytes > 0 else None
        self.vocab = cfg.vocab_size
        self._grammars: GrammarCompiler | None = None

    def warm_up(self) -> None:
        """Prefill and decode once before serving: lazy initialisation, compiling the pointwise
        kernels and capturing the first decode graphs happen here, not in a request. Where
        compiling fails the kernels run eagerly; where capturing fails decoding runs without graphs.
        The structured-output compiler (its view of the vocabulary) is built here too."""
        self.grammars.compile(("json_object", ""))
        try:
            self._warm_up()
        except Exception:
            if not self.llm.kernels.compiled:
                raise
            log.exception("compiling the pointwise kernels failed: running them eagerly")
            self.llm.compile_pointwise(False)
            self._warm_up()

    @torch.inference_mode()
    def _warm_up(self) -> None:
        emb = self.llm.embed(torch.tensor([0, 0, 0], device=self.device))
        self.llm.prefill(emb[:2], self.cache, slot=0, start=0)
        self.llm.prefill(emb[2:], self.cache, slot=0, start=2)  # a one-position chunk: its own shape
        batches = sorted({1, min(2, self.num_slots)})  # batch 1 and dynamic batches compile apart
        for batch in batches:
            ids = torch.zeros(batch, dtype=torch.long, device=self.device)  # contiguous, as in serving
            self.llm.decode(self.llm.embed(ids), [3] * batch, self.cache)
        if self.graphs is not None:
            try:
                for batch in batches:
                    self.graphs([0] * batch, [3] * batch)
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
        """Vision stage (its own thread): CLIP and both adapters for the images not in the cache.
        Touches only the vision modules, never the KV cache."""
        feats: list[ImageFeatures | None] = [None] * len(images)
        todo = []
        for i, img in enumerate(images):
            if img.pixels is None:  # the chat layer found it in the cache
                hit = self.vision_cache.take(img.digest) if self.vision_cache else None
                if hit is None:
                    raise CacheMiss("cached image features were evicted; retry the request")
                feats[i] = hit
            elif img.digest and self.vision_cache and (seen := self.vision_cache.peek(img.digest)) is not None:
                feats[i] = seen  # encoded moments ago (another choice of the same request, or the same upload)
            else:
                todo.append(i)
        if todo:
            new = self.model.encode_images([torch.from_numpy(images[i].pixels) for i in todo],
                                           [images[i].grid for i in todo])
            for i, f in zip(todo, new):
                feats[i] = f
                if self.vision_cache and images[i].digest:
                    self.vision_cache.put(images[i].digest, f)
        return feats  # type: ignore[return-value]

    @torch.inference_mode()
    def begin(self, seq: SequenceState) -> None:
        """Selection and prompt embedding for a newly admitted sequence (features ready)."""
        req = seq.request
        feats = req.features if req.features is not None else self.encode(req.images)
        embeds, reports = self.model.embed_prompt(req.input_ids, feats, slime_selection=req.slime_selection)  # [T, D]
        req.features = None
        seq.embeds = embeds
        seq.prompt_len = embeds.shape[0]
        if seq.prompt_len + req.params.max_tokens > self.max_model_len:
            raise PromptTooLong(f"the prompt needs {seq.prompt_len} positions (image rows included) and "
                                f"{req.params.max_tokens} were asked for the completion: more than the "
                                f"{self.max_model_len} of the context")
        matcher = self.grammars.matcher(req.params.grammar) if req.params.grammar else None
        seq.state = SeqState(SequenceSampler(req.params, req.input_ids, self.device),
                             IncrementalDetokenizer(self.lm.tokenizer, req.params.stop,
                                                    [t for t in req.input_ids[-4:] if t >= 0]), matcher)
        seq.state.images = reports

    @torch.inference_mode()
    def prefill_chunk(self, seq: SequenceState, chunk: int) -> tuple[int, TokenLogprob | None] | None:
        """Run up to `chunk` prompt positions; after the last one, sample the first token."""
        start = seq.prefilled
        end = min(seq.prompt_len, start + chunk)
        hidden = self.llm.prefill(seq.embeds[start:end], self.cache, slot=seq.slot, start=start)
        seq.prefilled = end
        if end < seq.prompt_len:
            return None
        seq.embeds = None
        tokens, infos = self.sample(self.llm.logits(hidden.unsqueeze(0)), [seq])
        return tokens[0], infos[0]

    # -- decode ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, seqs: list[SequenceState]) -> torch.Tensor:
        """One batched forward (sequence i sits in slot i and feeds its last token) -> logits `[B, V]`."""
        last = [s.output_ids[-1] for s in seqs]
        positions = [s.prompt_len + len(s.output_ids) - 1 for s in seqs]
        if self.graphs is not None:
            return self.graphs(last, positions)  # [B, V]
        hidden = self.llm.decode(self.llm.embed(torch.tensor(last, device=self.device)), positions, self.cache)
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
        """The structured-output compiler for this model's tokenizer (built at first use)."""
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.lm.tokenizer, self.vocab)
        return self._grammars

    @staticmethod
    def advance_grammar(seq: SequenceState, token: int) -> bool:
        """Feed a sampled token to the sequence's grammar; True once the document is complete."""
        matcher = seq.state.matcher
        if matcher is None:
            return False
        if not matcher.accept(token):
            raise RuntimeError(f"token {token} broke the grammar it was sampled under")
        return matcher.done

    def decode(self, seqs: list[SequenceState]) -> tuple[list[int], list[TokenLogprob | None]]:
        return self.sample(self.forward(seqs), seqs)

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

    def move(self, src: int, dst: int, length: int) -> None:
        self.cache.move_slot(src, dst, length)

    def is_stop_token(self, seq: SequenceState, token: int) -> bool:
        return not seq.request.params.ignore_eos and token in self.eos
