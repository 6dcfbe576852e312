"""Train a LoFiT adapter in LoFiT's two stages, on our own model implementation.

Stage 1 learns a scale `A` for every attention head (offsets fixed at 0) with an L1
penalty and ranks heads by the norm of their `A`; stage 2 learns offsets `v` for the
top-K heads only (scales fixed at 0). The loss covers completion tokens only. The base
weights stay frozen; only the per-head vectors receive gradients.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.causal_attention import CausalTrainingAttention
from engine.forward_context import ForwardContext, SequenceSlice
from engine.lofit_adapter import LofitAdapter
from engine.lofit_data import Example
from engine.models import CausalLM

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class LofitTrainConfig:
    """Hyper-parameters; the defaults follow LoFiT's recipe scaled to a CPU budget."""

    heads: float = 0.1  # < 1: fraction of all heads; >= 1: a count
    epochs_a: float = 1.0  # stage 1 passes over the data (fractions allowed)
    epochs_v: float = 2.0
    lr_a: float = 5e-3
    lr_v: float = 1e-2
    l1_a: float = 1e-3  # L1 weight on A in stage 1 (summed over all entries)
    l1_v: float = 0.0
    batch_size: int = 8
    init_std: float = 1e-3  # LoFiT initialises A and v from N(0, 1e-3)
    max_len: int = 512  # longer examples are dropped
    seed: int = 42
    dtype: str = "bfloat16"  # the frozen model's dtype during training

    def validate(self) -> None:
        if not self.heads > 0:
            raise ValueError("heads must be a positive count or a fraction in (0, 1)")
        if self.heads >= 1 and self.heads != int(self.heads):
            raise ValueError("heads >= 1 must be a whole number of heads")
        for name in ("epochs_a", "epochs_v", "lr_a", "lr_v", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        for name in ("l1_a", "l1_v"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.batch_size < 1 or self.max_len < 2:
            raise ValueError("batch_size must be >= 1 and max_len >= 2")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}")

    def num_heads(self, total: int) -> int:
        """How many heads stage 2 trains, out of `total`."""
        k = round(self.heads * total) if self.heads < 1 else int(self.heads)
        return max(1, min(total, k))


@dataclass
class TokenizedExample:
    ids: list[int]
    num_prompt: int  # the loss covers ids[num_prompt:]


@dataclass
class TrainResult:
    adapter: LofitAdapter
    head_ranking: list[tuple[int, int, float]]  # (layer, head, ||A||), best first
    losses: dict[str, list[float]] = field(default_factory=dict)  # stage -> per-step loss
    seconds: dict[str, float] = field(default_factory=dict)


def tokenize_examples(
    tokenizer: Any, examples: list[Example], eos_id: int | None, max_len: int
) -> list[TokenizedExample]:
    """Prompt and completion tokenized apart (as at inference, where the prompt is encoded
    alone), the completion closed by EOS; examples longer than max_len are dropped."""
    out = []
    for ex in examples:
        prompt = tokenizer.encode(ex.prompt, add_special_tokens=True)
        completion = tokenizer.encode(ex.completion, add_special_tokens=False)
        if eos_id is not None:
            completion.append(eos_id)
        if not completion or len(prompt) + len(completion) > max_len:
            continue
        if not prompt:  # a first token is needed to predict the completion from
            prompt = [completion.pop(0)]
            if not completion:
                continue
        out.append(TokenizedExample(prompt + completion, len(prompt)))
    return out


class HeadVectors(torch.nn.Module):
    """Per-head scale and offset for every layer: h -> (1 + A) * h + v, as a hook."""

    def __init__(self, num_layers: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        shape = (num_layers, num_heads, head_dim)
        self.A = torch.nn.Parameter(torch.zeros(shape))
        self.v = torch.nn.Parameter(torch.zeros(shape))
        self.register_buffer("v_mask", torch.zeros(num_layers, num_heads, 1))

    def hook(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        v = self.v[layer] * self.v_mask[layer]
        return torch.addcmul(v, h.float(), self.A[layer] + 1).to(h.dtype)


class LofitTrainer:
    """Runs both stages over tokenized examples on a frozen model (no packed weights)."""

    def __init__(
        self,
        model: CausalLM,
        tokenizer: Any,
        base_model: str,
        config: LofitTrainConfig,
        eos_id: int | None = None,
        progress: bool = True,
    ) -> None:
        config.validate()
        self.model = model
        self.tokenizer = tokenizer
        self.base_model = base_model
        self.config = config
        self.eos_id = eos_id if eos_id is not None else tokenizer.eos_token_id
        self.progress = progress
        c = model.config
        self.vectors = HeadVectors(c.num_layers, c.num_heads, c.head_dim)
        self.backend = CausalTrainingAttention()

    def train(self, examples: list[Example]) -> TrainResult:
        """Both stages on the same examples."""
        return self.train_stages(examples, examples)

    def train_stages(
        self, stage1_examples: list[Example], stage2_examples: list[Example]
    ) -> TrainResult:
        """Stage 1 (rank heads by ||A||) on one set, stage 2 (offsets) on another."""
        cfg = self.config
        data_a = self.tokenize(stage1_examples)
        data_v = self.tokenize(stage2_examples)
        torch.manual_seed(cfg.seed)
        rng = random.Random(cfg.seed)
        vec = self.vectors
        result_losses: dict[str, list[float]] = {}
        seconds: dict[str, float] = {}

        # Stage 1: A for all heads, v = 0.
        with torch.no_grad():
            vec.A.normal_(0, cfg.init_std)
            vec.v.zero_()
            vec.v_mask.zero_()
        start = time.monotonic()
        result_losses["A"] = self.run_stage(
            data_a, rng, vec.A, cfg.lr_a, cfg.epochs_a, cfg.l1_a, "stage 1 (A, all heads)"
        )
        seconds["A"] = time.monotonic() - start
        norms = vec.A.detach().norm(dim=-1)  # [L, H]
        order = torch.argsort(norms.flatten(), descending=True, stable=True).tolist()
        n_heads = norms.shape[1]
        ranking = [(i // n_heads, i % n_heads, float(norms.flatten()[i])) for i in order]
        k = cfg.num_heads(norms.numel())
        heads = sorted((layer, head) for layer, head, _ in ranking[:k])
        logger.info("Selected %d of %d heads by ||A||", k, norms.numel())

        # Stage 2: v for the selected heads, A = 0.
        with torch.no_grad():
            vec.A.zero_()
            vec.v.normal_(0, cfg.init_std)
            vec.v_mask.zero_()
            for layer, head in heads:
                vec.v_mask[layer, head] = 1
        start = time.monotonic()
        result_losses["v"] = self.run_stage(
            data_v, rng, vec.v, cfg.lr_v, cfg.epochs_v, cfg.l1_v, f"stage 2 (v, {k} heads)"
        )
        seconds["v"] = time.monotonic() - start

        v = vec.v.detach()
        head_dim = v.shape[-1]
        adapter = LofitAdapter(
            base_model=self.base_model,
            heads=heads,
            A=torch.zeros(len(heads), head_dim),
            v=torch.stack([v[layer, head] for layer, head in heads]),
        )
        return TrainResult(adapter, ranking, result_losses, seconds)

    def tokenize(self, examples: list[Example]) -> list[TokenizedExample]:
        max_len = self.config.max_len
        data = tokenize_examples(self.tokenizer, examples, self.eos_id, max_len)
        if not data:
            raise ValueError(f"no training example fits in max_len={max_len} tokens")
        if len(data) < len(examples):
            logger.info(
                "Dropped %d examples longer than %d tokens", len(examples) - len(data), max_len
            )
        return data

    def run_stage(
        self,
        data: list[TokenizedExample],
        rng: random.Random,
        param: torch.nn.Parameter,
        lr: float,
        epochs: float,
        l1: float,
        desc: str,
    ) -> list[float]:
        bs = self.config.batch_size
        steps = max(1, math.ceil(epochs * len(data) / bs))
        optimizer = torch.optim.AdamW([param], lr=lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _linear_decay(steps, warmup=max(1, steps // 20))
        )
        mask = self.vectors.v_mask if param is self.vectors.v else None
        losses: list[float] = []
        order: list[int] = []
        with tqdm(total=steps, desc=desc, disable=not self.progress) as bar:
            for _ in range(steps):
                if len(order) < bs:
                    more = list(range(len(data)))
                    rng.shuffle(more)
                    order.extend(more)
                batch = [data[i] for i in order[:bs]]
                del order[:bs]
                loss = self.loss(batch)
                total = loss
                if l1:
                    weights = param if mask is None else param * mask
                    total = loss + l1 * weights.abs().sum()
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                bar.update(1)
        return losses

    def loss(self, batch: list[TokenizedExample]) -> torch.Tensor:
        """Mean cross-entropy over the completion tokens of a packed batch."""
        ids: list[int] = []
        positions: list[int] = []
        slices = []
        predict_at: list[int] = []
        targets: list[int] = []
        for ex in batch:
            start = len(ids)
            slices.append(SequenceSlice(None, start, len(ex.ids), 0))
            ids.extend(ex.ids)
            positions.extend(range(len(ex.ids)))
            predict_at.extend(range(start + ex.num_prompt - 1, start + len(ex.ids) - 1))
            targets.extend(ex.ids[ex.num_prompt :])
        seq_lens = [len(ex.ids) for ex in batch for _ in ex.ids]
        ctx = ForwardContext(
            slices=slices,
            backend=self.backend,  # type: ignore[arg-type]
            seq_len_per_token=torch.tensor(seq_lens),
            head_output_hooks=[self.vectors.hook],
        )
        hidden = self.model(torch.tensor(ids), torch.tensor(positions), ctx)
        logits = self.model.compute_logits(hidden[torch.tensor(predict_at)]).float()
        return F.cross_entropy(logits, torch.tensor(targets))


def _linear_decay(steps: int, warmup: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return factor


def training_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]
