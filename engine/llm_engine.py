"""The engine: requests in, a step at a time, token deltas out. Single-threaded by design;
`AsyncEngine` drives it from its own thread for the server."""

from __future__ import annotations

import collections
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.attention_backend import AttentionBackend, CacheShape
from engine.attention_router import AttentionRouter
from engine.bias_bank import BiasBank
from engine.bias_profile import load_profile
from engine.detokenizer import IncrementalDetokenizer
from engine.full_attention import FullAttentionBackend
from engine.lofit_adapter import load_adapter
from engine.lofit_bank import LofitBank
from engine.model_config import ModelConfig
from engine.model_loader import load_model
from engine.model_runner import ModelRunner, auto_single_decode_threads
from engine.outputs import StepOutput
from engine.prefix_cache import PrefixCache, attention_settings
from engine.sampler import make_generator
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import Sequence
from engine.thread_tuner import ThreadTuner
from engine.tokenizer import eos_token_ids

logger = logging.getLogger(__name__)

ATTENTION_MODES = ("full", "retrieval", "streaming")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ContextLengthExceededError(ValueError):
    """The prompt (plus max_tokens) does not fit in the model's context."""


@dataclass
class EngineConfig:
    """Everything that shapes an engine; the server's flags map onto these fields."""

    model: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    max_device_tokens: int | None = None
    attention: str = "full"
    sink_tokens: int = 128
    window_tokens: int = 512
    top_k: int = 100
    index: str = "exact"
    index_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"ef": 64}
    num_threads: int | None = None
    # Threads for a step that decodes one sequence alone; None: `single_decode_threads`.
    single_decode_threads: int | None = None
    # Steps decoding several sequences run on one thread or all, whichever is measured
    # faster (engine/thread_tuner.py; CPU only). Off: all threads.
    adaptive_decode_threads: bool = True
    pack_weights: bool = True  # oneDNN-packed matmul weights on CPU (faster decode)
    # Few-row (decode) products from the quantisation blocks of the GGUF a model was
    # converted from (float32 on CPU; the default model): same weights, 1/4 the bytes.
    block_weights: bool = True
    prefix_cache_bytes: int = 2 << 30  # document (prefix) cache limit; 0 turns it off

    def validate(self) -> None:
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "sink_tokens", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.window_tokens < 1:
            raise ValueError("window_tokens must be >= 1")
        if self.single_decode_threads is not None and self.single_decode_threads < 0:
            raise ValueError("single_decode_threads must be >= 0 (0: all threads)")
        if self.prefix_cache_bytes < 0:
            raise ValueError("prefix_cache_bytes must be >= 0 (0 turns the prefix cache off)")
        from retrieval import INDEX_KINDS

        if self.index not in INDEX_KINDS:
            raise ValueError(f"index must be one of {INDEX_KINDS}, got {self.index!r}")


class LLMEngine:
    """Continuous-batching engine over one model and its attention backends."""

    def __init__(
        self,
        config: EngineConfig,
        model: torch.nn.Module,
        model_config: ModelConfig,
        tokenizer: Any,
        model_name: str,
    ) -> None:
        config.validate()
        self.config = config
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.device = torch.device(config.device)
        self.max_model_len = config.max_model_len or model_config.max_position_embeddings
        self.eos_token_ids = eos_token_ids(tokenizer, model_config.eos_token_ids)
        shape = CacheShape(
            num_layers=model_config.num_layers,
            num_kv_heads=model_config.num_kv_heads,
            head_dim=model_config.head_dim,
            dtype=_DTYPES[config.dtype],
            device=self.device,
        )
        # The server's mode first: it is the default for requests that name none.
        modes = [config.attention] + [m for m in ATTENTION_MODES if m != config.attention]
        self.router = AttentionRouter(shape, lambda mode: self._make_backend(shape, mode), modes)
        self.prefix_cache = PrefixCache(
            self.router,
            config.prefix_cache_bytes,
            namespace=(model_name, config.dtype),
            mode_settings=attention_settings(config),
        )
        self.lofit = LofitBank(model_config, _DTYPES[config.dtype], self.device)
        self.bias = BiasBank(model_config, _DTYPES[config.dtype], self.device)
        lone_threads = config.single_decode_threads
        if lone_threads is None:
            lone_threads = auto_single_decode_threads(model_config, shape.dtype, self.device)
        tuner = None
        if config.adaptive_decode_threads and self.device.type == "cpu":
            if torch.get_num_threads() > 1:
                tuner = ThreadTuner(torch.get_num_threads())
        self.runner = ModelRunner(
            model, self.router, self.device, self.lofit, self.bias, lone_threads, tuner
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_device_tokens=config.max_device_tokens,
            ),
            allocate=self._allocate,
            release=self._release,
            device_tokens=self._device_tokens,
        )
        self._requests: dict[str, list[Sequence]] = {}
        self._seq_ids = itertools.count()
        self.num_preemptions = 0
        # Seconds each sequence waited before its first step; drained by the metrics.
        self.queue_times: collections.deque[float] = collections.deque(maxlen=10_000)

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        """Load the model named by `config.model` (default model when None)."""
        config.validate()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        loaded = load_model(
            config.model, _DTYPES[config.dtype], config.device, block_weights=config.block_weights
        )
        if config.pack_weights and config.device == "cpu":
            loaded.model.pack_weights()
        return cls(config, loaded.model, loaded.config, loaded.tokenizer, loaded.name)

    def _make_backend(self, shape: CacheShape, mode: str) -> AttentionBackend:
        if mode == "full":
            return FullAttentionBackend(shape)
        from engine.index_retriever import retriever_factory
        from engine.tiered_attention import TieredAttentionBackend

        return TieredAttentionBackend(
            shape,
            mode=mode,
            sink_tokens=self.config.sink_tokens,
            window_tokens=self.config.window_tokens,
            top_k=self.config.top_k,
            retriever_factory=retriever_factory(self.config.index, self.config.index_options),
        )

    # -- sequence lifecycle -------------------------------------------------------------

    def _allocate(self, seq: Sequence) -> None:
        self.prefix_cache.allocate(seq)

    def _release(self, seq: Sequence) -> None:
        self.prefix_cache.release(seq)

    def _device_tokens(self, seq: Sequence, num_new: int) -> int:
        backend = self.router.backend(seq.attention_mode)
        return backend.device_tokens_for(seq.num_computed + num_new, num_new)

    # -- requests -----------------------------------------------------------------------

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt given as text or ids; ValueError naming `prompt` if bad."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        if not isinstance(prompt, list) or not prompt:
            raise ValueError("prompt must be a non-empty string or a non-empty list of token ids")
        vocab = self.model_config.vocab_size
        for t in prompt:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(f"prompt token ids must be integers in [0, {vocab}), got {t!r}")
        return list(prompt)

    def validate_request(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        attention: str | None = None,
        lofit: str | None = None,
        bias_correction: str | None = None,
    ) -> list[int]:
        """Check a request without queueing it; returns the prompt's token ids."""
        params.validate()
        prompt_ids = self.encode_prompt(prompt)
        mode = attention or self.config.attention
        if mode not in self.router.modes:
            raise ValueError(f"attention must be one of {self.router.modes}, got {attention!r}")
        if lofit is not None:
            self.lofit.slot(lofit)
        if bias_correction is not None:
            self.bias.resolve(bias_correction)
        self.check_context_length(len(prompt_ids), params.max_tokens)
        for t in params.logit_bias or {}:
            if t >= self.model_config.vocab_size:
                raise ValueError(f"logit_bias token id {t} is outside the vocabulary")
        return prompt_ids

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        attention: str | None = None,
        lofit: str | None = None,
        bias_correction: str | None = None,
    ) -> list[int]:
        """Queue a request (its `n` samples); returns the prompt's token ids.

        `lofit` names a loaded LoFiT adapter and `bias_correction` a loaded bias profile's
        correction (`"anchored"`, `"prior"`, optionally `":<profile>"`), both applied to
        this request only.
        """
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt_ids = self.validate_request(prompt, params, attention, lofit, bias_correction)
        bias = None if bias_correction is None else self.bias.resolve(bias_correction)
        bias_slot = 0 if bias is None else self.bias.slots[bias]
        mode = attention or self.config.attention
        adapter_slot = 0 if lofit is None else self.lofit.slot(lofit)
        seqs = []
        for index in range(params.n):
            seed = None if params.seed is None else params.seed + index
            seq = Sequence(
                seq_id=next(self._seq_ids),
                request_id=request_id,
                index=index,
                prompt_token_ids=prompt_ids,
                params=params,
                detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_ids, params),
                eos_token_ids=self.eos_token_ids,
                attention_mode=mode,
                lofit=lofit,
                adapter_slot=adapter_slot,
                bias_correction=bias,
                bias_slot=bias_slot,
                generator=make_generator(seed, self.device) if seed is not None else None,
            )
            seqs.append(seq)
            self.scheduler.add(seq)
        self._requests[request_id] = seqs
        return prompt_ids

    # -- bias profiles ---------------------------------------------------------------------

    def load_bias_profile(self, name: str, path: str) -> None:
        """Load the bias profile directory at `path` under `name`; ValueError if it is
        malformed or was calibrated for another model."""
        self.bias.register(name, load_profile(path, self.model_config, self.model_name))

    def bias_profiles(self) -> list[str]:
        """Names of the loaded bias profiles."""
        return self.bias.names()

    # -- LoFiT adapters -------------------------------------------------------------------

    def load_lofit(self, name: str, path: str, check_base_model: bool = False) -> None:
        """Load the LoFiT adapter directory at `path` under `name`; ValueError if it is
        malformed, does not fit the model, or (with `check_base_model`) names another model."""
        base_model = self.model_name if check_base_model else None
        self.lofit.register(name, load_adapter(path, self.model_config, base_model))

    def unload_lofit(self, name: str) -> None:
        """Drop LoFiT adapter `name`; ValueError while an unfinished request uses it."""
        self.lofit.slot(name)
        users = sorted(
            {s.request_id for seqs in self._requests.values() for s in seqs if s.lofit == name}
        )
        if users:
            raise ValueError(
                f"lofit adapter {name!r} is in use by {len(users)} request(s), e.g. {users[0]!r}"
            )
        self.lofit.unregister(name)
        self.prefix_cache.drop_adapter(name)

    def lofit_adapters(self) -> list[str]:
        """Names of the loaded LoFiT adapters."""
        return self.lofit.names()

    def check_context_length(self, num_prompt_tokens: int, max_tokens: int | None) -> None:
        """ValueError when the prompt (plus max_tokens) cannot fit in the context."""
        if num_prompt_tokens >= self.max_model_len:
            raise ContextLengthExceededError(
                f"prompt is {num_prompt_tokens} tokens, the model's context is "
                f"{self.max_model_len} tokens (prompt too long)"
            )
        if max_tokens is not None and num_prompt_tokens + max_tokens > self.max_model_len:
            raise ContextLengthExceededError(
                f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the "
                f"model's context of {self.max_model_len} tokens"
            )

    def abort(self, request_id: str) -> bool:
        """Drop a request and free everything its sequences hold. False if unknown."""
        seqs = self._requests.pop(request_id, None)
        if seqs is None:
            return False
        for seq in seqs:
            self.scheduler.remove(seq)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # -- the step -----------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        """Schedule, run the model once, sample, detokenise; return the deltas."""
        scheduled = self.scheduler.schedule()
        for seq in scheduled.preempted:
            logger.info("Preempted request %s (device-tier budget)", seq.request_id)
        self.num_preemptions += len(scheduled.preempted)
        now = time.monotonic()
        for seq, _ in scheduled.work:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
                self.queue_times.append(now - seq.arrival_time)
        if scheduled.empty:
            return []
        outputs = []
        for seq, token, logprob in self.runner.step(scheduled.work):
            outputs.append(self._append_token(seq, token, logprob))
        self.prefix_cache.after_step(seq for seq, _ in scheduled.work)
        return outputs

    def _append_token(self, seq: Sequence, token: int, logprob: Any) -> StepOutput:
        params = seq.params
        seq.output_token_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        text = ""
        finish_reason = None
        if not params.ignore_eos and token in self.eos_token_ids:
            finish_reason = "stop"
        elif token in params.stop_token_ids:
            finish_reason, seq.stop_reason = "stop", token
        else:
            text = seq.detokenizer.add_token(token)
            if seq.detokenizer.stop_reason is not None:
                finish_reason, seq.stop_reason = "stop", seq.detokenizer.stop_reason
        if finish_reason is None:
            if params.max_tokens is not None and len(seq.output_token_ids) >= params.max_tokens:
                finish_reason = "length"
            elif seq.num_tokens >= self.max_model_len:
                finish_reason = "length"
        if finish_reason is not None:
            if seq.detokenizer.stop_reason is None:
                text += seq.detokenizer.finish()
            seq.finish_reason = finish_reason
            self.scheduler.finish(seq)
            self._forget_if_done(seq.request_id)
        return StepOutput(
            request_id=seq.request_id,
            index=seq.index,
            text=text,
            token_ids=[token],
            logprobs=[logprob] if logprob is not None else [],
            finished=finish_reason is not None,
            finish_reason=finish_reason,
            stop_reason=seq.stop_reason,
            num_prompt_tokens=len(seq.prompt_token_ids),
            num_output_tokens=len(seq.output_token_ids),
        )

    def _forget_if_done(self, request_id: str) -> None:
        seqs = self._requests.get(request_id)
        if seqs is not None and all(s.finished for s in seqs):
            del self._requests[request_id]

    def memory_stats(self) -> dict[str, int]:
        """Bytes and tokens held by the KV tiers of every live sequence (their own parts),
        and bytes held by the prefix cache (`prefix_cache_bytes`)."""
        return {**self.router.memory_stats(), "prefix_cache_bytes": self.prefix_cache.held_bytes}

    def retrieval_stats(self) -> dict[str, int]:
        """Host-tier index counters (queries, scanned, candidates) since start."""
        totals: dict[str, int] = {}
        for backend in list(self.router.backends.values()):
            for key, value in getattr(backend, "retrieval_stats", dict)().items():
                totals[key] = totals.get(key, 0) + value
        return totals
