"""Find and correct the anchored bias with the logit lens (Li & Gao 2024, per request).

On rotation-balanced calibration prompts (each question once with every gold letter, so
the mean preference for a letter is content-free) one capture pass records, at the last
position ("Answer:"), every MLP neuron's activation, every head's output, the embedding
and each head's attention to the first option's letter. The logit lens then measures,
through the final norm (at each prompt's own scale) and the unembedding:

- the residual stream after each layer: where " A" rises above the other letters;
- each neuron's contribution, activation x value vector (its down_proj column);
- each head's direct contribution, and the part of it carried by its attention to the
  first option's letter.

The profile's anchored correction scales the neurons that push " A" up most by
`neuron_scale` and adds offsets to the outputs of the heads that push it up most. The
offsets lie in the span that moves the letter logits (least-norm through the linearised
logit lens) and are solved by a few damped Newton passes so that, over the calibration
prompts, every letter's mean probability (softmax over the letters) reaches 1/K. The
PriDe prior comes from the same capture: per question the softmax of the mean
log-probabilities over its rotations, averaged over the first `prior_questions`
questions. `calibrate_grid` makes several profiles from one capture pass (to choose a
configuration on held-out data).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

from engine.bias_profile import BiasProfile
from engine.forward_context import ForwardContext, SequenceSlice
from engine.llm_engine import LLMEngine
from engine.mc_data import MCItem, format_prompt, letter_token_ids
from engine.mc_eval import letter_logits, summarise, token_batches

_PROBE_PROFILE = "__calibrating__"


@dataclass
class CalibrationConfig:
    max_questions: int | None = 48  # questions used, each in all its rotations
    num_neurons: int = 10
    neuron_scale: float = 0.5
    num_heads: int = 10
    iterations: int = 4  # correction passes over the calibration prompts
    max_logit_step: float = 1.0  # per pass, on the linearised letter logits
    # The fit drives the mean of softmax(letter logits / T) to 1/K per letter; with T well
    # below 1 those sharpened probabilities approach the shares of argmax predictions.
    share_temperature: float = 1.0
    prior_questions: int = 32
    batch_tokens: int = 4096

    def __post_init__(self) -> None:
        if not self.share_temperature > 0:
            raise ValueError(f"share_temperature must be positive, got {self.share_temperature}")


@dataclass
class Capture:
    """Last-position records of an uncorrected pass, one row per prompt."""

    acts: torch.Tensor  # [N, layers, intermediate]
    heads: torch.Tensor  # [N, layers, heads, head_dim]
    embed: torch.Tensor  # [N, hidden]
    first_attn: torch.Tensor  # [N, layers, heads]: attention to the first letter
    other_attn: torch.Tensor  # [N, layers, heads]: mean attention to the other letters
    first_value: torch.Tensor  # [N, layers, kv_heads, head_dim]: V at the first letter
    logits: torch.Tensor  # [N, letters]


def _dense(w: torch.Tensor) -> torch.Tensor:
    return (w.to_dense() if w.is_mkldnn else w).float()


def _letter_positions(prompt: list[int], marks: list[list[int]]) -> list[int]:
    """Position of each option's letter token: the token ending its 'X:' line start."""
    out = []
    for mark in marks:
        n = len(mark)
        hits = [i for i in range(len(prompt) - n + 1) if prompt[i : i + n] == mark]
        if not hits:
            raise ValueError("an option letter line was not found in the tokenised prompt")
        out.append(hits[-1] + n - 2)  # mark = "\nX:" -> the X token
    return out


class _AttentionProbe:
    """Wraps the attention backend to record each sequence's last-query attention to its
    option letters (full-attention caches only)."""

    def __init__(self, backend, letter_pos: list[list[int]], num_layers: int) -> None:
        self.backend = backend
        self.letter_pos = letter_pos
        self.first: list[torch.Tensor] = [None] * num_layers  # [B, H]
        self.other: list[torch.Tensor] = [None] * num_layers
        self.value: list[torch.Tensor] = [None] * num_layers  # [B, Hkv, D]

    def forward(self, layer, q, k, v, ctx, scale):
        out = self.backend.forward(layer, q, k, v, ctx, scale)
        firsts, others, values = [], [], []
        for s, pos in zip(ctx.slices, self.letter_pos, strict=True):
            keys = s.cache.k[layer][:, : s.total_len]  # [Hkv, L, D]
            group = q.shape[1] // keys.shape[0]
            scores = torch.einsum("hd,hld->hl", q[s.end - 1], keys.repeat_interleave(group, 0))
            probs = torch.softmax(scores.float() * scale, dim=-1)
            firsts.append(probs[:, pos[0]])
            others.append(probs[:, pos[1:]].mean(dim=1))
            values.append(s.cache.v[layer][:, pos[0]].float())
        self.first[layer] = torch.stack(firsts)
        self.other[layer] = torch.stack(others)
        self.value[layer] = torch.stack(values)
        return out


@torch.inference_mode()
def capture(
    engine: LLMEngine,
    prompts: list[list[int]],
    letter_pos: list[list[int]],
    letter_ids: list[int],
    batch_tokens: int = 4096,
    progress: bool = False,
) -> Capture:
    """Run `prompts` uncorrected (full attention) and record the last positions."""
    model = engine.runner.model
    num_layers = engine.model_config.num_layers
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in Capture.__dataclass_fields__}
    with tqdm(total=len(prompts), disable=not progress, desc="capture", unit="prompt") as bar:
        for start, end in token_batches(prompts, batch_tokens):
            batch = prompts[start:end]
            caches = [engine.router.new_cache("full") for _ in batch]
            slices, ids, pos = [], [], []
            for cache, p in zip(caches, batch, strict=True):
                slices.append(SequenceSlice(cache, len(ids), len(p), 0))
                ids += p
                pos += range(len(p))
            probe = _AttentionProbe(engine.router, letter_pos[start:end], num_layers)
            ctx = ForwardContext(slices=slices, backend=probe)
            last = ctx.last_token_indices().to(engine.device)
            acts, heads = [None] * num_layers, [None] * num_layers

            def on_act(layer, act, acts=acts, last=last):
                acts[layer] = act.index_select(0, last).float().cpu()
                return act

            def on_head(layer, h, heads=heads, last=last):
                heads[layer] = h.index_select(0, last).float().cpu()
                return h

            ctx.mlp_act_hooks.append(on_act)
            ctx.head_output_hooks.append(on_head)
            input_ids = torch.tensor(ids, device=engine.device)
            try:
                hidden = model(input_ids, torch.tensor(pos, device=engine.device), ctx)
                logits = model.compute_logits(hidden.index_select(0, last)).float()
            finally:
                for cache in caches:
                    engine.router.free(cache)
            parts["acts"].append(torch.stack(acts, 1))
            parts["heads"].append(torch.stack(heads, 1))
            parts["embed"].append(_dense(model.embed_tokens)[input_ids[last]].cpu())
            parts["first_attn"].append(torch.stack(probe.first, 1).cpu())
            parts["other_attn"].append(torch.stack(probe.other, 1).cpu())
            parts["first_value"].append(torch.stack(probe.value, 1).cpu())
            parts["logits"].append(logits[:, letter_ids].cpu())
            bar.update(end - start)
    return Capture(**{k: torch.cat(v) for k, v in parts.items()})


class LogitLens:
    """The model's output map for the letter logits, linearised per prompt."""

    def __init__(self, engine: LLMEngine, letter_ids: list[int]) -> None:
        model = engine.runner.model
        c = engine.model_config
        self.config = c
        self.o = [_dense(layer.o_weight).cpu() for layer in model.layers]  # [hidden, H*D]
        self.down = [_dense(layer.down_weight).cpu() for layer in model.layers]  # [hidden, I]
        gamma = _dense(model.norm).cpu()
        unembed = _dense(model.lm_head).cpu()[letter_ids]  # [K, hidden]
        k = len(letter_ids)
        self.eps = c.norm_eps
        self.gamma = gamma
        self.unembed = unembed
        # centred letter directions and "first letter minus the mean of the others"
        self.centred = (torch.eye(k) - 1.0 / k) @ unembed * gamma  # [K, hidden]
        self.first_dir = gamma * (unembed[0] - unembed[1:].mean(0))  # [hidden]

    def residuals(self, cap: Capture) -> list[torch.Tensor]:
        """Residual stream at the last position after each layer (rebuilt exactly from the
        captured head outputs and activations: the Llama blocks have no biases here)."""
        x = cap.embed.clone()
        out = []
        n = x.shape[0]
        for layer in range(self.config.num_layers):
            x = x + cap.heads[:, layer].reshape(n, -1) @ self.o[layer].T
            x = x + cap.acts[:, layer] @ self.down[layer].T
            out.append(x)
        return out

    def rms(self, x: torch.Tensor) -> torch.Tensor:
        return (x.pow(2).mean(-1) + self.eps).sqrt()

    def head_map(self, layer: int, head: int) -> torch.Tensor:
        """[hidden, head_dim]: one head's output into the residual stream."""
        d = self.config.head_dim
        return self.o[layer][:, head * d : (head + 1) * d]


def _rank(scores: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """The (row, column) pairs of the `k` largest positive entries, largest first."""
    flat = scores.flatten()
    k = min(k, int((flat > 0).sum()))
    top = torch.topk(flat, k).indices.tolist() if k else []
    return [divmod(i, scores.shape[1]) for i in top]


def analyse(lens: LogitLens, cap: Capture) -> dict:
    """Logit-lens statistics at the last position, averaged over the prompts."""
    res = lens.residuals(cap)
    rms = lens.rms(res[-1])  # final-norm scale of each prompt
    inv = (1.0 / rms).unsqueeze(1)
    c = lens.config
    layer_lens = []
    for x in res:
        normed = x / lens.rms(x).unsqueeze(1) * lens.gamma
        letters = normed @ lens.unembed.T
        layer_lens.append(float((letters[:, 0] - letters[:, 1:].mean(1)).mean()))
    # neuron contribution to (first letter - others): act * (value vector . direction) / rms
    neuron = torch.stack(
        [
            (cap.acts[:, layer] * inv).mean(0) * (lens.down[layer].T @ lens.first_dir)
            for layer in range(c.num_layers)
        ]
    )  # [layers, I]
    head_direct = torch.zeros(c.num_layers, c.num_heads)
    head_via_first = torch.zeros(c.num_layers, c.num_heads)
    group = c.num_heads // c.num_kv_heads
    for layer in range(c.num_layers):
        for h in range(c.num_heads):
            u = lens.head_map(layer, h).T @ lens.first_dir  # [D]
            head_direct[layer, h] = ((cap.heads[:, layer, h] @ u) / rms).mean()
            v_first = cap.first_value[:, layer, h // group]
            head_via_first[layer, h] = (cap.first_attn[:, layer, h] * (v_first @ u) / rms).mean()
    return {
        "residual_lens": layer_lens,
        "neuron": neuron,
        "head_direct": head_direct,
        "head_via_first": head_via_first,
        "first_attn": cap.first_attn.mean(0),
        "other_attn": cap.other_attn.mean(0),
        "inv_rms": float(inv.mean()),
    }


def pride_prior(logits: torch.Tensor, num_options: int) -> torch.Tensor:
    """PriDe's prior over the letters from the letter logits of whole rotation groups
    ([questions * num_options, K], each question's rotations consecutive)."""
    logp = torch.log_softmax(logits.double(), dim=1).view(-1, num_options, num_options)
    return torch.softmax(logp.mean(dim=1), dim=1).mean(dim=0).float()


def _centred_mean(logits: torch.Tensor) -> torch.Tensor:
    return (logits - logits.mean(dim=1, keepdim=True)).mean(dim=0)


def _profile(
    base, letters, letter_ids, neurons, scale, heads, offsets, prior, calibration
) -> BiasProfile:
    return BiasProfile(
        base_model=base,
        letters=letters,
        letter_token_ids=letter_ids,
        neurons=neurons,
        neuron_scales=torch.full((len(neurons),), float(scale)),
        heads=heads,
        head_offsets=offsets,
        prior=prior,
        calibration=calibration,
    )


def calibrate(
    engine: LLMEngine,
    questions: list[MCItem],
    config: CalibrationConfig | None = None,
    max_questions: int | None = None,
    progress: bool = False,
) -> BiasProfile:
    """Calibrate a profile on `questions` (each used in all its cyclic rotations)."""
    config = config or CalibrationConfig()
    return calibrate_grid(engine, questions, [config], max_questions, progress)[0]


@dataclass
class _Prepared:
    """The calibration prompts and what one uncorrected capture pass found in them."""

    questions: int
    prompts: list[list[int]]
    letters: list[str]
    letter_ids: list[int]
    gold: torch.Tensor
    cap: Capture
    lens: LogitLens
    stats: dict
    prior: torch.Tensor
    seconds: float  # the capture pass and the analysis


# what the capture pass depends on: every config of one grid must agree on these
_CAPTURE_FIELDS = ("max_questions", "prior_questions", "batch_tokens")


def calibrate_grid(
    engine: LLMEngine,
    questions: list[MCItem],
    configs: list[CalibrationConfig],
    max_questions: int | None = None,
    progress: bool = False,
) -> list[BiasProfile]:
    """One profile per config, all from one capture pass over `questions`.

    The configs must agree on `max_questions`, `prior_questions` and `batch_tokens`.
    Configs that differ only in `iterations` share their correction passes (the passes
    are deterministic, so the profile after n passes is a snapshot of a longer run).
    """
    if not configs:
        raise ValueError("calibrate_grid needs at least one config")
    for f in _CAPTURE_FIELDS:
        if len({getattr(c, f) for c in configs}) > 1:
            raise ValueError(f"every config of a calibration grid must have the same {f}")
    if engine.model_config.architecture != "llama":
        raise ValueError("bias calibration supports Llama-family models")
    limit = max_questions if max_questions is not None else configs[0].max_questions
    prep = _prepare(engine, _unique_questions(questions)[:limit], configs[0], progress)
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(configs):
        key = tuple(
            getattr(c, f) for f in CalibrationConfig.__dataclass_fields__ if f != "iterations"
        )
        groups.setdefault(key, []).append(i)
    out: list[BiasProfile | None] = [None] * len(configs)
    for members in groups.values():
        longest = max(members, key=lambda i: configs[i].iterations)
        fitted = _fit(engine, prep, configs[longest], progress)
        for i in members:
            p = fitted[min(configs[i].iterations, len(fitted) - 1)]
            config = {**p.calibration["config"], "iterations": configs[i].iterations}
            out[i] = replace(p, calibration={**p.calibration, "config": config})
    return out


def _prepare(
    engine: LLMEngine, questions: list[MCItem], config: CalibrationConfig, progress: bool
) -> _Prepared:
    k = len(questions[0].options)
    if any(len(q.options) != k for q in questions):
        raise ValueError("every calibration item must have the same number of options")
    if len(questions) < 2:
        raise ValueError("bias calibration needs at least 2 questions")
    start = time.monotonic()
    tok = engine.tokenizer
    items = [r for q in questions for r in q.rotations()]
    prompts = [tok.encode(format_prompt(it)) for it in items]
    letter_ids = letter_token_ids(tok, k)
    marks = [tok.encode(f"\n{c}:", add_special_tokens=False) for c in items[0].letters]
    positions = [_letter_positions(p, marks) for p in prompts]
    cap = capture(engine, prompts, positions, letter_ids, config.batch_tokens, progress)
    lens = LogitLens(engine, letter_ids)
    return _Prepared(
        questions=len(questions),
        prompts=prompts,
        letters=list(items[0].letters),
        letter_ids=letter_ids,
        gold=torch.tensor([it.answer for it in items]),
        cap=cap,
        lens=lens,
        stats=analyse(lens, cap),
        prior=pride_prior(cap.logits[: config.prior_questions * k], k),
        seconds=time.monotonic() - start,
    )


def _fit(
    engine: LLMEngine, prep: _Prepared, config: CalibrationConfig, progress: bool
) -> list[BiasProfile]:
    """The profile after each correction pass 0..config.iterations (fewer when there are
    no heads to offset: then pass 0 is the only one)."""
    start = time.monotonic()
    stats, lens, prompts, letter_ids = prep.stats, prep.lens, prep.prompts, prep.letter_ids
    k = len(letter_ids)
    neurons = _rank(stats["neuron"], config.num_neurons)
    heads = _rank(stats["head_direct"], config.num_heads)

    # J maps the stacked head offsets to the mean centred letter logits (linearised).
    d = engine.model_config.head_dim
    jac = torch.cat([lens.centred @ lens.head_map(l, h) for l, h in heads], 1) * stats["inv_rms"]
    theta = torch.zeros(len(heads) * d)
    base = engine.model_name

    def make(theta: torch.Tensor, calibration: dict) -> BiasProfile:
        offsets = theta.view(len(heads), d)
        return _profile(
            base,
            prep.letters,
            letter_ids,
            neurons,
            config.neuron_scale,
            heads,
            offsets,
            prep.prior,
            calibration,
        )

    def measure(theta: torch.Tensor) -> torch.Tensor:
        engine.bias.register(_PROBE_PROFILE, make(theta, {}))
        try:
            return letter_logits(
                engine,
                prompts,
                letter_ids,
                f"anchored:{_PROBE_PROFILE}",
                attention="full",
                batch_tokens=config.batch_tokens,
            )
        finally:
            engine.bias.unregister(_PROBE_PROFILE)

    temp = config.share_temperature
    history, sharpened, snapshots = [], [], []
    rounds = tqdm(range(config.iterations + 1), disable=not progress, desc="correct")
    gain, prev = 1.0, None
    for i in rounds:
        logits = measure(theta)
        probs = torch.softmax(logits.double() / temp, dim=1)
        residual = (probs.mean(0) - 1.0 / k).float()  # the letters' mean (sharpened) probs
        history.append([round(float(x), 4) for x in torch.softmax(logits.double(), 1).mean(0)])
        sharpened.append([round(float(x), 4) for x in probs.mean(0)])
        snapshots.append(
            (theta.clone(), logits, list(history), list(sharpened), time.monotonic() - start)
        )
        if not heads or i == config.iterations:
            break
        if prev is not None:
            # actual change / linearised prediction of the last step damps the next one
            prev_residual, predicted = prev
            actual = residual - prev_residual
            gain = float(actual @ predicted / (predicted @ predicted).clamp(min=1e-12))
            gain = min(max(gain, 0.2), 2.0)
        # mean softmax Jacobian (d probs / d logits) at the current point times the
        # linearised logit map
        soft = (torch.diag_embed(probs) - probs.unsqueeze(2) * probs.unsqueeze(1)).mean(0) / temp
        jac_p = soft.float() @ jac
        step = -(torch.linalg.pinv(jac_p) @ residual) / gain
        # trust region: no letter logit may move by more than max_logit_step per pass
        reach = float((jac @ step).abs().max())
        if reach > config.max_logit_step:
            step = step * (config.max_logit_step / reach)
        prev = (residual, jac_p @ step)
        theta = theta + step
    before = summarise(prep.cap.logits.argmax(1), prep.gold, k).as_dict()
    found = {
        "residual_lens_first_minus_others": [round(x, 4) for x in stats["residual_lens"]],
        "neuron_contrib": [round(float(stats["neuron"][l, i]), 4) for l, i in neurons],
        "head_contrib": [round(float(stats["head_direct"][l, h]), 4) for l, h in heads],
        "head_contrib_via_first_letter": [
            round(float(stats["head_via_first"][l, h]), 4) for l, h in heads
        ],
        "head_attention_first_vs_others": [
            [round(float(stats["first_attn"][l, h]), 4), round(float(stats["other_attn"][l, h]), 4)]
            for l, h in heads
        ],
    }
    profiles = []
    for theta, logits, history, sharp, fit_s in snapshots:
        calibration = {
            "questions": prep.questions,
            "prompts": len(prompts),
            "config": {f: getattr(config, f) for f in CalibrationConfig.__dataclass_fields__},
            "seconds": round(prep.seconds + fit_s, 1),
            "before": before,
            "after": summarise(logits.argmax(1), prep.gold, k).as_dict(),
            "mean_letter_probs": history,
            **({"mean_sharpened_letter_probs": sharp} if temp != 1.0 else {}),
            **found,
        }
        profiles.append(make(theta, calibration))
    return profiles


def _unique_questions(items: list[MCItem]) -> list[MCItem]:
    """One item per question (rotations of the same question collapse to the first)."""
    seen, out = set(), []
    for it in items:
        key = (it.question, frozenset(it.options))
        if key not in seen:
            seen.add(key)
            out.append(it)
    return out
