"""The continuous-batching engine: one worker thread runs the model for every request at once.

``generate`` runs on the event loop and only hands a new sequence to the worker. The worker
loops: take new and cancelled requests, let the scheduler pick this step's batch, run one forward,
sample, detokenize, check stop strings, and hand the step's new text to the streams all at once
(``put_many_threadsafe``: one wake-up of the event loop per step). When nothing is left it
sleeps on a condition variable until ``generate``, a cancel or ``shutdown`` wakes it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import threading
import time
from collections.abc import Sequence as Seq
from typing import Any

import torch

from ..model.backend import select_backend
from ..model.runner import MIN_LANE_TOKENS, ModelRunner, kv_bytes_per_token
from ..protocol import EngineInfo, FinishReason, GenerationOutput
from ..quant.int8 import quantize_linears_int8, resolve_quantization
from ..sampling_params import SamplingParams
from ..stream import RequestStream, put_many_threadsafe
from . import sampling_native
from .block_manager import BlockManager
from .detokenizer import IncrementalDetokenizer
from .grammar import GrammarMasks
from .sampler import SampleOutput, SamplingBatch, sample
from .scheduler import ScheduledChunk, Scheduler
from .sequence import Sequence, SequenceStatus
from .stop_strings import StopStringMatcher

logger = logging.getLogger("chatstream.engine")

_INT64 = (1 << 64) - 1


class LLMEngine:
    """Continuous batching over any transformers causal LM, with a paged, prefix-cached KV cache.

    ``max_num_seqs`` caps the sequences decoded together. ``max_model_len`` is the longest
    sequence (prompt + reply) admitted, by default the model's own limit; pass the server's
    context length so the default KV budget fits what is really served. ``kv_cache_memory_bytes``
    bounds the KV cache; by default ``max_num_seqs`` full ``max_model_len`` contexts plus half as
    much again for cached prefixes (with prefix caching on), but no more than a quarter of the
    host's available memory (half of free GPU memory on CUDA). ``device`` and ``dtype`` move and
    cast the model first (default: as it is). ``max_num_batched_tokens`` caps the tokens of one
    step, so long prompts are prefilled in chunks between decode steps.

    ``enable_prefix_caching`` keeps the K/V of full blocks after their sequence ends and reuses
    them for any later prompt starting with the same tokens (a chat's next turn, a regenerate).
    ``quantization``: ``"int8"`` runs every linear layer with int8 weights and per-token int8
    activations on CPU (about 2x faster steps, mean NLL unchanged within 0.02 nats on the default
    model; replies still never depend on the batch), ``"none"``/``None`` keeps the model's float
    layers, ``"auto"`` picks int8 for a float32 model on CPU, and none elsewhere (see :mod:`..quant.int8`).
    ``num_threads`` sets torch's intra-op threads (process-wide) and the native kernels' pool; by
    default on CPU every usable core where the GGUF block kernels run the products on that pool, else
    one fewer, so the event loop keeps a core (see :func:`..model.backend.default_threads`).
    ``kernels``: ``"auto"`` runs the fused forward's RoPE, KV writes, decode attention and (on CPUs
    with AVX-512 VNNI) int8 layers through chatstream's C kernels (:mod:`..ops.native`, built at first
    use) for a float32 Llama-family model on CPU when they build and pass their check, else through
    PyTorch's operators; ``"native"`` requires them; ``"torch"`` never uses them.
    ``forward_lanes``: threads that share one step's forward and sampling on CPU, each over its own
    sequences (see :class:`..model.runner.ModelRunner`); the tokens are the same.
    ``kv_cache_dtype``: the KV cache's element type, ``"float32"``, ``"bfloat16"``, ``"float16"``
    (half the bytes a token) or ``"auto"``: the model's dtype (:func:`..model.backend.select_backend`,
    which chooses the whole path once).
    The engine switches the model to its own attention implementation
    and quantized layers until :meth:`shutdown`.
    """

    # SamplingParams.grammar, logit_bias and logprobs are honoured (the mock and remote engines cannot).
    constrains = True

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_num_seqs: int = 8,
        max_model_len: int | None = None,
        kv_cache_memory_bytes: int | None = None,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        max_num_batched_tokens: int = 2048,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        quantization: str | None = "auto",
        num_threads: int | None = None,
        kernels: str = "auto",
        forward_lanes: int = 1,
        kv_cache_dtype: str = "auto",
    ) -> None:
        if device is not None and torch.device(device) != model.device:
            model = model.to(device)
        if dtype is not None and dtype != model.dtype:
            model = model.to(dtype)
        model.eval()
        self.tokenizer = tokenizer
        self._grammars = GrammarMasks(tokenizer)
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        model_limit: int = getattr(config, "max_position_embeddings", None) or 1 << 20
        if max_model_len is not None and max_model_len < 1:
            raise ValueError("max_model_len must be >= 1")
        self.max_model_len: int = min(max_model_len or model_limit, model_limit)
        self._vocab_size: int = model.get_input_embeddings().num_embeddings
        self._eos_ids = _eos_token_ids(model, tokenizer)

        self.quantization = resolve_quantization(quantization, model)
        self._restore_linears = quantize_linears_int8(model) if self.quantization == "int8" else None
        try:
            # The backend first: its KV dtype sizes the blocks.
            backend = select_backend(model, kernels=kernels, threads=num_threads, block_size=block_size,
                                     kv_cache_dtype=kv_cache_dtype)
            self._num_threads: int | None = backend[0].threads if model.device.type == "cpu" else num_threads
            kv_token_bytes = kv_bytes_per_token(model, backend[0].kv_torch_dtype)
            block_bytes = kv_token_bytes * block_size
            if kv_cache_memory_bytes is None:
                in_flight = kv_token_bytes * max_num_seqs * self.max_model_len
                headroom = in_flight // 2 if enable_prefix_caching else 0
                kv_cache_memory_bytes = _default_kv_cache_bytes(model, in_flight + headroom)
            num_blocks = kv_cache_memory_bytes // block_bytes
            if num_blocks < 1:
                raise ValueError(
                    f"kv_cache_memory_bytes={kv_cache_memory_bytes} is less than one KV block ({block_bytes} bytes)"
                )
            self._blocks = BlockManager(num_blocks, block_size, enable_prefix_caching=enable_prefix_caching)
            self._runner = ModelRunner(model, self._blocks, backend=backend, lanes=forward_lanes)
            # Sampling's native kernel follows the same flag: logits are float32 CPU rows for any model on CPU.
            self._sampling_kernels = sampling_native.load(kernels) if model.device.type == "cpu" else None
        except Exception:  # e.g. kernels="native" where none can be built: leave the model as it was
            if self._restore_linears is not None:
                self._restore_linears()
            raise
        self._scheduler = Scheduler(
            self._blocks, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens
        )
        self.backend = self._runner.backend
        self.kv_bytes_per_token = kv_token_bytes
        logger.info("backend: %s; %d forward lane%s; %s sampling", self.backend.describe(), self._runner.lanes,
                    "s" if self._runner.lanes > 1 else "", "native" if self._sampling_kernels else "torch")
        logger.info(
            "KV cache: %d blocks of %d tokens (%.0f MiB) on %s; prefix caching %s",
            num_blocks, block_size, num_blocks * block_bytes / 2**20, model.device,
            "on" if enable_prefix_caching else "off",
        )

        # Shared with the worker, guarded by _wake's lock.
        self._wake = threading.Condition()
        self._incoming: list[Sequence] = []
        self._cancelled: set[Sequence] = set()
        # Constrained sequences whose grammar compiles on _grammar_pool (its first mask included: ~1 s
        # for a 47 KB schema); in the engine's step that stalled every user's stream for as long. The
        # pool also builds llguidance's tokenizer at start (see grammar.py).
        self._compiling: set[Sequence] = set()
        self._grammar_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatstream-grammar")
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._broken: str | None = None
        self._outbox: list[tuple[RequestStream, GenerationOutput]] = []  # worker only; see _flush
        self._step_logprobs: torch.Tensor | None = None  # this step's [B, V] log-probabilities, when a row asks
        self.num_steps = 0  # for metrics: steps run and the time they took
        self.step_seconds = 0.0

    # -- introspection (approximate when read while the worker runs) --
    @property
    def ready(self) -> bool:
        return not self._stopping and self._broken is None

    @property
    def error(self) -> str | None:
        """Why the worker crashed, if it did (then every request fails and the engine is not ready)."""
        return self._broken

    @property
    def num_running(self) -> int:
        return len(self._scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self._scheduler.waiting) + len(self._incoming) + len(self._compiling)

    @property
    def grammars_prepared(self) -> bool:
        """Whether llguidance's per-vocabulary state is built (started beside the engine at start),
        so a constrained request costs only its own grammar's compilation."""
        return self._grammars.prepared

    @property
    def num_preemptions(self) -> int:
        """Sequences evicted so far to make room for older ones (recomputed later)."""
        return self._scheduler.num_preemptions

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request owns, those holding a cached prefix included."""
        return self._blocks.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Unowned blocks that keep a prefix for later prompts (recycled least recently used first)."""
        return self._blocks.num_cached_blocks

    @property
    def prefix_cache_queried_tokens(self) -> int:
        """Prompt tokens looked up in the prefix cache so far (one lookup per admission)."""
        return self._blocks.num_queried_tokens

    @property
    def prefix_cache_hit_tokens(self) -> int:
        """Of those, tokens whose K/V were found in the cache and not computed again."""
        return self._blocks.num_hit_tokens

    @property
    def num_blocks(self) -> int:
        return self._blocks.num_blocks

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(max_model_len=self.max_model_len, num_blocks=self.num_blocks, block_size=self.block_size,
                          error=self.error, backend=self.backend.as_dict(), kv_bytes_per_token=self.kv_bytes_per_token)

    @property
    def block_size(self) -> int:
        return self._blocks.block_size

    # -- lifecycle --
    async def start(self) -> None:
        self._ensure_started()

    async def shutdown(self) -> None:
        with self._wake:
            if self._stopping:
                return
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)  # the step in flight finishes first
        self._grammar_pool.shutdown(wait=False, cancel_futures=True)
        self._runner.close()
        if self._restore_linears is not None:
            self._restore_linears()
            self._restore_linears = None

    def _ensure_started(self) -> None:
        if self._thread is None and not self._stopping:
            self._thread = threading.Thread(target=self._run, name="chatstream-engine", daemon=True)
            self._thread.start()
            self._grammar_pool.submit(self._grammars.prepare)

    # -- event-loop side --
    def generate(
        self,
        prompt_token_ids: Seq[int],
        params: SamplingParams,
        request_id: str | None = None,
        *,
        messages: Seq[dict[str, str]] | None = None,  # the prompt is in the ids; kept for the protocol
    ) -> RequestStream:
        seq: Sequence | None = None  # bound below; the cancel callback only fires later
        stream = RequestStream(asyncio.get_running_loop(), lambda _: self._request_cancel(seq), request_id)
        prompt = list(prompt_token_ids)
        error = self._check_prompt(prompt)
        if error is not None:
            stream.put_nowait(_final("error", len(prompt), 0, error=error))
            return stream
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        seq = Sequence(
            request_id=stream.request_id,
            token_ids=prompt,
            params=params,
            seed=_to_int64(seed),
            stream=stream,
            detokenizer=IncrementalDetokenizer(self.tokenizer),
            stop_matcher=StopStringMatcher(params.stop),
        )
        self._ensure_started()
        with self._wake:
            if self._stopping or self._broken is not None:
                stream.put_nowait(_final("error", len(prompt), 0, error="the engine is shut down"))
                return stream
            if params.grammar is None:
                self._incoming.append(seq)
                self._wake.notify()
                return stream
            self._compiling.add(seq)
        self._grammar_pool.submit(self._compile, seq)
        return stream

    def _compile(self, seq: Sequence) -> None:
        """On the grammar thread: the sequence's matcher, then the sequence to the scheduler (unless it
        was cancelled or the engine stopped meanwhile); a grammar that fails ends it here, unscheduled."""
        assert seq.params.grammar is not None
        error = None
        try:
            seq.matcher = self._grammars.matcher(seq.params.grammar)
        except Exception as exc:
            error = f"the grammar failed: {exc}"
        with self._wake:
            if seq not in self._compiling:
                return
            self._compiling.discard(seq)
            if error is None:
                self._incoming.append(seq)
                self._wake.notify()
                return
        seq.status = SequenceStatus.FINISHED
        put_many_threadsafe([(seq.stream, _final("error", seq.num_prompt_tokens, 0, error=error))])

    def _check_prompt(self, prompt: list[int]) -> str | None:
        if self._broken is not None:
            return f"the engine failed: {self._broken}"
        if not prompt:
            return "the prompt is empty"
        if min(prompt) < 0 or max(prompt) >= self._vocab_size:
            return f"the prompt holds token ids outside the vocabulary (0..{self._vocab_size - 1})"
        if len(prompt) > self.max_model_len:
            return f"the prompt has {len(prompt)} tokens; the model's context is {self.max_model_len}"
        if len(prompt) > self._blocks.capacity_tokens:
            return (
                f"the prompt has {len(prompt)} tokens but the KV cache holds only "
                f"{self._blocks.capacity_tokens}; raise kv_cache_memory_bytes"
            )
        return None

    def _request_cancel(self, seq: Sequence | None) -> None:
        if seq is None:
            return
        with self._wake:
            self._cancelled.add(seq)
            self._wake.notify()

    # -- worker side --
    def _run(self) -> None:
        if self._num_threads is not None:
            torch.set_num_threads(self._num_threads)
        try:
            with torch.inference_mode():
                while self._iterate():
                    pass
        except BaseException as exc:  # a bug: fail every request rather than leave them hanging
            logger.exception("engine worker crashed")
            self._broken = repr(exc)
            with self._wake:
                self._scheduler.waiting.extend(self._incoming)
                self._incoming.clear()
                compiling, self._compiling = self._compiling, set()
            self._finish_all("error", self._broken)
            self._finish_unscheduled(compiling, "error", self._broken)
            self._flush()

    def _iterate(self) -> bool:
        """One worker iteration; False once the engine is shutting down."""
        try:
            return self._iterate_once()
        finally:
            self._flush()

    def _flush(self) -> None:
        """Hand this iteration's outputs to their streams, with one wake-up of the event loop."""
        if self._outbox:
            outputs, self._outbox = self._outbox, []
            put_many_threadsafe(outputs)

    def _iterate_once(self) -> bool:
        with self._wake:
            while not (self._incoming or self._cancelled or self._stopping or self._scheduler.has_work):
                self._wake.wait()
            incoming, self._incoming = self._incoming, []
            cancelled, self._cancelled = self._cancelled, set()
            stopping = self._stopping
            unscheduled = cancelled & self._compiling  # still compiling: never reaches the scheduler
            self._compiling -= unscheduled
            if stopping:
                unscheduled |= self._compiling
                self._compiling = set()
        for seq in incoming:
            self._scheduler.add(seq)
        self._finish_unscheduled(unscheduled, "cancelled")
        for seq in cancelled - unscheduled:
            if not seq.is_finished:
                self._finish(seq, "cancelled")
        if stopping:
            self._finish_all("cancelled")
            return False
        if self._scheduler.has_work:
            started = time.perf_counter()
            self._step()
            self.num_steps += 1
            self.step_seconds += time.perf_counter() - started
        return True

    def _step(self) -> None:
        plan = self._scheduler.schedule()
        for seq in plan.out_of_memory:  # owns the whole cache and needs more: the context is full
            self._finish(seq, "length")
        if not plan.chunks:
            return
        try:
            sampled, logits = self._runner.execute(plan.chunks)
        except Exception as exc:  # e.g. out of memory: fail this step's requests, keep serving
            logger.exception("engine step failed")
            for chunk in plan.chunks:
                self._finish(chunk.seq, "error", error=f"generation failed: {exc!r}")
            return
        sampling = {id(chunk) for chunk in sampled}
        for chunk in plan.chunks:
            if id(chunk) not in sampling:
                # A long prompt (Open WebUI's 36 built-in tools: 7k tokens) is prefilled over several
                # steps; an empty event says it is moving, so the stall watchdog does not end it.
                self._outbox.append((chunk.seq.stream, GenerationOutput(text="")))
        for chunk in plan.chunks:
            self._blocks.register_computed(chunk.seq)
        mask = self._constrain(sampled, logits)
        self._step_logprobs = None
        for row, (chunk, token) in enumerate(zip(sampled, self._sample(sampled, logits, mask))):
            if chunk.seq.is_finished:  # its grammar failed
                continue
            if isinstance(token, int) and chunk.seq.params.logprobs is not None and self._step_logprobs is not None:
                chunk.seq.pending_logprobs.append(self._logprob_entry(self._step_logprobs[row], token,
                                                                      chunk.seq.params.logprobs))
            if isinstance(token, Exception):
                self._finish(chunk.seq, "error", error=f"sampling failed: {token!r}")
                continue
            try:
                self._append(chunk.seq, token)
            except Exception as exc:  # one sequence's fault never ends another's reply
                logger.exception("appending a token failed for request %s", chunk.seq.request_id)
                if not chunk.seq.is_finished:
                    self._finish(chunk.seq, "error", error=f"generation failed: {exc!r}")

    def _constrain(self, sampled: list[ScheduledChunk], logits: torch.Tensor) -> torch.Tensor | None:
        """Apply each row's logit bias to its logits, in place, and return the step's grammar masks
        (packed, one row per sampled row; None when no row has a grammar) for the sampler. Rows whose
        grammar fails are finished with an error (their row is still sampled, the token never used)."""
        matchers: list[Any] = [None] * len(sampled)
        for row, chunk in enumerate(sampled):
            seq = chunk.seq
            if seq.params.logit_bias:
                ids = torch.tensor([t for t, _ in seq.params.logit_bias], dtype=torch.long, device=logits.device)
                bias = torch.tensor([b for _, b in seq.params.logit_bias], dtype=logits.dtype, device=logits.device)
                logits[row].index_add_(0, ids.clamp(max=logits.shape[1] - 1), bias * (ids < logits.shape[1]))
            if seq.params.grammar is None:
                continue
            matchers[row] = seq.matcher  # compiled before the sequence was scheduled (_compile)
        if all(m is None for m in matchers):
            return None
        try:
            return self._grammars.masks(matchers)
        except Exception as exc:
            logger.exception("grammar masks failed")
            for row, matcher in enumerate(matchers):
                if matcher is not None:
                    self._finish(sampled[row].seq, "error", error=f"the grammar failed: {exc!r}")
            return None

    def _sample(self, sampled: list[ScheduledChunk], logits: torch.Tensor,
                mask: torch.Tensor | None) -> list[int | Exception]:
        """One token per row (``mask``: the grammars', see :meth:`_constrain`); if the batch fails,
        each row alone, so only a faulty row fails."""
        try:
            want = any(c.seq.params.logprobs is not None for c in sampled)

            def rows(span: tuple[int, int]) -> SampleOutput:
                start, end = span
                return sample(logits[start:end], self._sampling_batch(sampled[start:end], logits.device),
                              None if mask is None else mask[start:end], want_logprobs=want,
                              kernels=self._sampling_kernels)

            # Rows are sampled independently (each by its own seed), so lanes may take a share each.
            outs = self._runner.map_lanes(rows, _spans(len(sampled), self._runner.lanes))
            self._step_logprobs = (torch.cat([o.logprobs for o in outs if o.logprobs is not None])
                                   if want else None)
            return torch.cat([o.tokens for o in outs]).tolist()
        except Exception:
            logger.exception("batched sampling failed; sampling row by row")
        tokens: list[int | Exception] = []
        for row, chunk in enumerate(sampled):
            try:
                batch = self._sampling_batch([chunk], logits.device)
                tokens.append(int(sample(logits[row : row + 1], batch, None if mask is None else mask[row : row + 1],
                                         kernels=self._sampling_kernels).tokens[0]))
            except Exception as exc:
                tokens.append(exc)
        return tokens

    def _logprob_entry(self, row: torch.Tensor, token: int, top: int) -> dict[str, Any]:
        """OpenAI's ``{"token", "logprob", "bytes", "top_logprobs"}`` for one sampled token (the
        distribution after penalties, bias and grammar, before temperature and truncation)."""
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            text = self.tokenizer.decode([token_id])
            return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode("utf-8"))}

        best = row.topk(top) if top else None
        return {**entry(token, float(row[token])), "top_logprobs": [] if best is None else [
            entry(int(i), float(v)) for v, i in zip(best.values.tolist(), best.indices.tolist())]}

    def _sampling_batch(self, sampled: list[ScheduledChunk], device: torch.device) -> SamplingBatch:
        seqs = [c.seq for c in sampled]
        params = [s.params for s in seqs]

        def tensor(values: list[Any], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        batch = SamplingBatch(
            temperature=tensor([p.temperature for p in params], torch.float32),
            top_k=tensor([p.top_k for p in params], torch.long),
            top_p=tensor([p.top_p for p in params], torch.float32),
            repetition_penalty=tensor([p.repetition_penalty for p in params], torch.float32),
            seed=tensor([s.seed for s in seqs], torch.long),
            step=tensor([s.num_completion_tokens for s in seqs], torch.long),
        )
        penalised = [(row, s) for row, s in enumerate(seqs) if s.params.repetition_penalty != 1.0]
        if penalised:
            batch.seen_rows = tensor([row for row, s in penalised for _ in s.token_ids], torch.long)
            batch.seen_tokens = tensor([t for _, s in penalised for t in s.token_ids], torch.long)
        if any(p.min_p > 0 for p in params):
            batch.min_p = tensor([p.min_p for p in params], torch.float32)
        counted = [(row, s) for row, s in enumerate(seqs) if s.params.presence_penalty or s.params.frequency_penalty]
        if counted:
            batch.presence_penalty = tensor([p.presence_penalty for p in params], torch.float32)
            batch.frequency_penalty = tensor([p.frequency_penalty for p in params], torch.float32)
            replies = [(row, s.token_ids[s.num_prompt_tokens :]) for row, s in counted]
            batch.output_rows = tensor([row for row, reply in replies for _ in reply], torch.long)
            batch.output_tokens = tensor([t for _, reply in replies for t in reply], torch.long)
        return batch

    def _append(self, seq: Sequence, token: int) -> None:
        seq.token_ids.append(token)
        if token in self._eos_ids:
            self._finish(seq, "stop")
            return
        if seq.matcher is not None and not seq.matcher.consume_token(token):
            self._finish(seq, "error", error=f"the grammar refused token {token}: {seq.matcher.get_error()}")
            return
        text, stopped = seq.stop_matcher.feed(seq.detokenizer.step(token))
        if seq.matcher is not None and seq.matcher.is_stopped():  # the grammar is complete
            stopped = True
        if stopped:
            self._finish(seq, "stop", text)
        elif seq.num_completion_tokens >= seq.params.max_new_tokens or seq.num_tokens > self.max_model_len:
            self._finish(seq, "length", text)
        elif text:
            self._outbox.append((seq.stream, GenerationOutput(text=text, logprobs=_take_logprobs(seq))))

    def _finish(self, seq: Sequence, reason: FinishReason, text: str = "", error: str | None = None) -> None:
        self._scheduler.finish(seq)
        text += seq.stop_matcher.flush()  # held-back text that never became a stop string
        self._outbox.append(
            (seq.stream, _final(reason, seq.num_prompt_tokens, seq.num_completion_tokens, text=text, error=error,
                                logprobs=_take_logprobs(seq)))
        )

    def _finish_all(self, reason: FinishReason, error: str | None = None) -> None:
        for seq in [*self._scheduler.running, *self._scheduler.waiting]:
            self._finish(seq, reason, error=error)

    def _finish_unscheduled(self, seqs: set[Sequence], reason: FinishReason, error: str | None = None) -> None:
        """End sequences that never reached the scheduler (their grammar was compiling)."""
        for seq in seqs:
            seq.status = SequenceStatus.FINISHED
            self._outbox.append((seq.stream, _final(reason, seq.num_prompt_tokens, 0, error=error)))


def _spans(rows: int, lanes: int) -> list[tuple[int, int]]:
    """``rows`` cut into at most ``lanes`` runs of at least :data:`..model.runner.MIN_LANE_TOKENS`."""
    lanes = max(1, min(lanes, rows // MIN_LANE_TOKENS))
    bounds = [rows * i // lanes for i in range(lanes + 1)]
    return list(zip(bounds, bounds[1:]))


def _final(
    reason: FinishReason, prompt_tokens: int, completion_tokens: int, *, text: str = "", error: str | None = None,
    logprobs: tuple[dict[str, Any], ...] = (),
) -> GenerationOutput:
    return GenerationOutput(
        text=text,
        finished=True,
        finish_reason=reason,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        error=error,
        logprobs=logprobs,
    )


def _take_logprobs(seq: Sequence) -> tuple[dict[str, Any], ...]:
    taken = tuple(seq.pending_logprobs)
    seq.pending_logprobs.clear()
    return taken


def _to_int64(seed: int) -> int:
    seed &= _INT64
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def _eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    generation_config = getattr(model, "generation_config", None)
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    return frozenset(ids)


def _default_kv_cache_bytes(model: Any, enough: int) -> int:
    """A quarter of free host memory (half of free GPU memory), capped at what the engine could use."""
    if model.device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(model.device)
        available = free // 2
    else:
        available = _mem_available_bytes() // 4
    return min(available, enough)


def _mem_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30  # not Linux: assume a modest machine
