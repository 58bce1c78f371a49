"""The fast engine: rollout.generate's samples, with the speed tricks the teaching core leaves out.

An `Engine` is built once a run and owns everything its decode steps read:
  - its weights: a copy of the policy's architecture in the compute dtype, written in place once a
    step by `load_weights` from the training weights (under FSDP2 from the gathered shards; with
    LoRA, W + (alpha / r) B A): the "weight sync" of veRL's and OpenRLHF's hybrid engines, by hand.
    Their addresses never change, so CUDA graphs stay valid. An fp32 run in one process without
    adapters shares the policy's own weights instead (share_weights=True);
  - with the static decode, the KV cache (in the compute dtype, preallocated for the run's rows and
    longest sequence), the step's buffers and its CUDA graphs (static_decode.py), captured once per
    (batch size, span) for the whole run. The dynamic decode has no graph to read its cache at a
    fixed address: it allocates one per call, of the call's size, freed when the call returns, so
    the training phases after it get that memory back.
`Engine.generate` takes rollout.generate's arguments and returns its `Rollout`: the same tokens and
log-probs up to float rounding (tests/test_engine.py), from the same per-row noise.

The switch (`Settings`; the trainers' --engine picks one in samplers.py). Every path runs on any
device, so a CPU test runs the GPU's code; only graph replay and the kernels differ:
  dynamic  the CPU's engine. Prefill grouped by prompt length (identical prompts once, no padding
           computed: MedQA prompt lengths vary about 2x); each decode step's shapes are the live
           rows and the filled slots; a few rows' linears as (W x^T)^T (a layout MKL runs faster
           for a skinny x); per-row decode attention where left padding is much of the span.
  static   the GPU's engine. One padded prefill (a GPU is bound by kernel launches, not FLOPs);
           the decode step at static shapes (static_decode.py), replayed as CUDA graphs on CUDA.
Both decode the same way otherwise:
  - Attention folds the query heads that share a KV head into the query axis, so one SDPA call
    reads each cached key and value once. On CUDA it never uses cuDNN's kernel, which builds a
    graph for every new key length.
  - The host runs ahead of the device: a step's sampling, the record of its tokens and of what kind
    of token each row drew (an EOS, one that may complete a stop string) are device ops; the host
    looks every `check_every` steps with one small copy, decodes text only for rows whose newest
    token can complete a stop string, then removes the rows that ended by swap-remove (a live row
    from the end fills each hole: only the moved rows' caches are copied). A row that ended
    decodes on until the host sees it; what it draws after its end is masked out.
BENCHMARKS.md measures each against transformers' generate and against rollout.generate.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, replace

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoModelForCausalLM

import rollout
import static_decode
from engine_forward import Attention, forward_last, run_prefill, write_at

# Per-row decode attention pays off on the CPU when a row's cached keys (numbers: span x kv_heads x
# head_dim) are at least this many (SmolLM2 with MedQA prompts: yes; the tiny test models: no).
PER_ROW_MIN_NUMBERS = 2 ** 15
# What the host learns of a sampled token (Watch): nothing, an end of sequence, or a possible end
# of a stop string.
PLAIN, EOS, MAYBE_STOP = 0, 1, 2


@dataclass(frozen=True)
class Settings:
    """The engine's code paths (see the module docstring)."""
    decode: str  # "dynamic" | "static"
    prefill: str  # "grouped" | "padded"
    cpu_layout: bool  # (W x^T)^T for a few rows, per-row decode attention
    check_every: int  # decode steps between the host's looks at which rows ended
    graphs: bool = False  # replay the static step as CUDA graphs
    compile_step: bool = False  # compile the static step with Inductor before capturing it


DYNAMIC = Settings("dynamic", "grouped", cpu_layout=True, check_every=1)
STATIC = Settings("static", "padded", cpu_layout=False, check_every=8)


def settings_for(choice: str, device, compile_step: bool = False) -> Settings:
    """--engine dynamic | static | auto (static on CUDA, dynamic elsewhere) as Settings, with CUDA
    graphs wherever the static step runs on CUDA."""
    cuda = torch.device(device).type == "cuda"
    if choice == "auto":
        choice = "static" if cuda else "dynamic"
    if choice == "dynamic":
        return DYNAMIC
    if choice == "static":
        return replace(STATIC, graphs=cuda, compile_step=compile_step)
    raise ValueError(f"engine {choice!r}: choose dynamic, static or auto")


def generate(model, input_ids, attention_mask, max_new_tokens, settings: Settings | None = None,
             **sampling) -> rollout.Rollout:
    """rollout.generate through a one-call Engine (tests, benchmarks, scripts); `sampling`:
    rollout.generate's keyword arguments. Under autocast the engine's weights are a copy in the
    autocast dtype, as a bf16 run's engine holds them; else they are the model's own."""
    device = input_ids.device
    amp = torch.is_autocast_enabled(device.type)
    engine = Engine(model, settings or settings_for("auto", device),
                    dtype=torch.get_autocast_dtype(device.type) if amp else None,
                    share_weights=not amp)
    engine.load_weights(model.named_parameters())
    return engine.generate(input_ids, attention_mask, max_new_tokens, **sampling)


class Engine:
    """The sampler of a run (see the module docstring). max_rows, max_len: the largest call the
    run makes (rows; prompt + response tokens), which the static decode's cache is sized for. A
    larger call grows that cache, and the static step is built again (its graphs read the old
    cache)."""

    def __init__(self, model, settings: Settings = DYNAMIC, dtype=None, max_rows=1, max_len=1,
                 share_weights=True):
        weight = model.get_input_embeddings().weight
        self.settings = settings
        self.dtype = dtype or weight.dtype
        self.device = weight.device
        self.shares_weights = share_weights
        self.model = model if share_weights else inference_copy(model, self.dtype)
        self.rows, self.max_len = max_rows, max_len
        self.cache = None  # the static decode's KVCache [rows, KV, max_len, d] a layer, self.dtype
        self.static = None  # static_decode.StaticStep, kept for the run
        self.static_steps_built = 0
        self.token_kinds = {}  # (tokenizer, stops, vocabulary) -> [V] int8 of PLAIN / EOS / ...

    @torch.no_grad()
    def load_weights(self, named_tensors) -> None:
        """Write the training weights into the engine's own, in place (cast to its dtype).
        named_tensors: (Hugging Face name, full tensor) of every parameter; tied names (the
        embedding and lm_head) may come once or twice. Nothing to do when the weights are shared."""
        if self.shares_weights:
            return
        own = self.model.state_dict(keep_vars=True)
        written = set()
        for name, tensor in named_tensors:
            if name not in own:
                raise KeyError(f"load_weights: {name!r} is no parameter of the engine's model")
            own[name].copy_(tensor)
            written.add(id(own[name]))
        missing = [name for name, p in self.model.named_parameters() if id(p) not in written]
        if missing:
            raise KeyError(f"load_weights: no weights given for {missing[:3]} ({len(missing)})")

    def generate(self, input_ids, attention_mask, max_new_tokens, temperature=1.0, top_p=1.0,
                 top_k=0, eos_token_id=None, stop_strings=None, tokenizer=None, generator=None,
                 pad_token_id=None, uniforms=None) -> rollout.Rollout:
        """rollout.generate's samples (the same arguments), fast. input_ids, attention_mask:
        [B, P], left padded."""
        model, device = self.model, input_ids.device
        B, P = input_ids.shape
        rollout.check_supported(model, P + max_new_tokens)
        n_real = attention_mask.long().sum(-1)  # [B] real prompt tokens per row
        if int(n_real.min()) == 0:
            raise ValueError("every prompt needs at least one real token")
        stops = rollout.StopRule(model, eos_token_id, stop_strings, tokenizer, device)
        pad = rollout.pad_id(model, tokenizer, pad_token_id)
        out = rollout.Outputs.empty(B, max_new_tokens, pad, device)
        sampling = Sampling(temperature, top_k, top_p, uniforms, generator)
        # the engine's weights are in the compute dtype already: no autocast inside
        with torch.no_grad(), torch.autocast(device.type, enabled=False), attention_kernels(device):
            prefill = self.static_prefill if self.settings.decode == "static" else \
                self.dynamic_prefill
            step, logits = prefill(input_ids, attention_mask, n_real, max_new_tokens)
            kinds = self.kinds_of_tokens(stops, tokenizer, logits.shape[-1])
            decode(step, logits, sampling, Watch(kinds, stops, out, self.settings.check_every),
                   n_real)
        return out.rollout(input_ids, attention_mask)

    def grow_static_cache(self, rows: int, length: int) -> None:
        """The static decode's KV cache for the run, grown first if this call needs more."""
        if self.cache is None or rows > self.rows or length > self.max_len:
            self.rows, self.max_len = max(rows, self.rows), max(length, self.max_len)
            self.cache = rollout.KVCache.allocate(self.model, self.rows, self.max_len, self.dtype)
            self.static = None  # its graphs read the old cache

    def dynamic_prefill(self, input_ids, attention_mask, n_real, max_new_tokens):
        B, P = input_ids.shape
        cache = rollout.KVCache.allocate(self.model, B, P + max_new_tokens, self.dtype)
        logits = run_prefill(self.model, input_ids, attention_mask, n_real, cache,
                             self.settings.prefill)
        return DynamicStep(self.model, cache, n_real, P, self.settings.cpu_layout), logits

    def static_prefill(self, input_ids, attention_mask, n_real, max_new_tokens):
        """The prompts into the run's cache, and the run's static step readied for this call (its
        mask buffer: the slots each row may attend to)."""
        B, P = input_ids.shape
        self.grow_static_cache(static_decode.batch_size_for(max(B, self.rows)), P + max_new_tokens)
        if self.static is None:
            self.static = static_decode.StaticStep(fixed_step(self.model, self.cache), self.rows,
                                                   self.max_len, self.device,
                                                   self.settings.graphs, self.settings.compile_step)
            self.static_steps_built += 1
        for k, v in zip(self.cache.keys, self.cache.values):
            k.zero_()  # masked slots are read too: they must be finite (0 * NaN is NaN)
            v.zero_()
        first_rows = rollout.KVCache([k[:B, :, :P] for k in self.cache.keys],
                                     [v[:B, :, :P] for v in self.cache.values])
        logits = run_prefill(self.model, input_ids, attention_mask, n_real, first_rows,
                             self.settings.prefill)
        slots = torch.arange(self.max_len, device=self.device)  # [S]
        may_attend = self.static.may_attend  # [C, S]
        may_attend.zero_()
        may_attend[:B] = (slots[None, :] >= (P - n_real)[:, None]) & (slots[None, :] < P)
        may_attend[B:, 0] = True  # rows holding no sequence: one open slot keeps them finite
        return StaticDecode(self.static, self.cache, P), logits

    def kinds_of_tokens(self, stops: rollout.StopRule, tokenizer, vocab: int) -> torch.Tensor:
        """[V] int8 on the device: EOS, MAYBE_STOP or PLAIN for each token id, built once per
        tokenizer and stop strings. A stop string ends inside the newest token, so that token's
        text holds the string's last character, or is a piece of a multi-byte one ("\ufffd")."""
        key = (id(tokenizer), tuple(stops.stop_strings or ()), tuple(stops.eos_ids.tolist()), vocab)
        if key not in self.token_kinds:
            kinds = torch.full((vocab,), PLAIN, dtype=torch.int8)
            if stops.stop_strings:
                known = min(vocab, len(tokenizer)) if hasattr(tokenizer, "__len__") else vocab
                texts = tokenizer.batch_decode([[i] for i in range(known)])
                lasts = {s[-1] for s in stops.stop_strings}
                # a string ending in whitespace may end where a tokenizer's clean-up moved text
                anything = any(c.isspace() for c in lasts)
                maybe = [anything or "\ufffd" in text or any(c in text for c in lasts)
                         for text in texts]
                kinds[:known] = torch.tensor(maybe, dtype=torch.int8) * MAYBE_STOP
                kinds[known:] = MAYBE_STOP  # ids the tokenizer does not know: always look
            kinds[stops.eos_ids.cpu()] = EOS  # an EOS ends the row whatever its text
            self.token_kinds[key] = kinds.to(self.device)
        return self.token_kinds[key]


def inference_copy(model, dtype):
    """The policy's architecture for sampling, in `dtype`, on its device, without gradients: the
    engine's own weights (load_weights fills them). Its buffers (RoPE's inverse frequencies) are
    the policy's, as they are."""
    device = model.get_input_embeddings().weight.device
    with torch.device("meta"):
        twin = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), dtype=dtype)
    twin = twin.to_empty(device=device).requires_grad_(False).eval()
    twin.tie_weights()  # to_empty gives tied parameters storage of their own: tie them again
    own = dict(twin.named_buffers())
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name in own:
                own[name].copy_(buffer)
    return twin


@contextlib.contextmanager
def attention_kernels(device):
    """On CUDA, SDPA's flash, memory-efficient and math kernels, never cuDNN's (it builds a graph
    for each new shape). The CPU has no cuDNN kernel: nothing changes there."""
    if torch.device(device).type != "cuda":
        yield
        return
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        yield


# -------------------------------------------------------------------------------------------------
# The decode loop: rollout.generate's steps 2-4, shared by the dynamic and the static step
# -------------------------------------------------------------------------------------------------
@dataclass
class Sampling:
    temperature: float
    top_k: int
    top_p: float
    uniforms: torch.Tensor | None  # [B, max_new_tokens], or None: drawn from `generator`
    generator: torch.Generator | None

    def noise(self, t: int, rows, slot_rows: list, batch: int):
        """Step t's uniforms of the live rows [b] (None when greedy), as rollout.step_uniforms
        draws them; a CPU generator's draw is indexed on the host (no device-to-host copy)."""
        if self.temperature == 0 or self.uniforms is not None:
            return rollout.step_uniforms(t, rows, batch, self.temperature, self.uniforms, None)
        at = self.generator.device if self.generator is not None else rows.device
        drawn = torch.rand(batch, generator=self.generator, device=at)  # one per original row
        index = torch.tensor(slot_rows) if at.type == "cpu" else rows.to(at)
        return drawn[index].to(rows.device, non_blocking=True)


def decode(step, logits, sampling: Sampling, watch: Watch, n_real) -> None:
    """From the prefill's logits [B, V]: sample, record, decode the next token of every live row,
    until every row ended or the length limit; the results go into watch.out. step(tokens [b],
    positions [b], t) -> the next logits, rows :b live; step.move(Move, t) moves its rows as
    swap-remove does."""
    out = watch.out
    B, max_new_tokens = out.tokens.shape
    rows = torch.arange(B, device=logits.device)  # [b] the original row of each live slot
    slot_rows = list(range(B))  # the same on the host: compaction needs no device-to-host copy
    positions = n_real.clone()  # [b] the position id of each live row's next token
    for t in range(max_new_tokens):
        b = len(slot_rows)
        u = sampling.noise(t, rows, slot_rows, B)  # [b] or None
        tokens, logps = rollout.sample_tokens(logits[:b], sampling.temperature, sampling.top_k,
                                              sampling.top_p, u)  # [b], [b]
        out.record(t, rows, tokens, logps)
        watch.record(t, rows, tokens)
        if t == max_new_tokens - 1:
            break
        if (t + 1) % watch.check_every == 0:
            ended = watch.check(t)  # the host's look: every row that ended up to step t
            b = sum(row not in ended for row in slot_rows)
            holes, movers = swap_plan(slot_rows, ended)
            if holes:
                index = torch.tensor(holes + movers, device=rows.device)
                into, source = index[:len(holes)], index[len(holes):]
                step.move(Move(holes, movers, into, source), t)
                for x in (rows, tokens, positions):
                    x[into] = x[source]
                for hole, mover in zip(holes, movers):
                    slot_rows[hole] = slot_rows[mover]
            if b < len(slot_rows):
                del slot_rows[b:]
                rows, tokens, positions = rows[:b], tokens[:b], positions[:b]
            if b == 0:
                break
        logits = step(tokens, positions, t)
        positions = positions + 1
    watch.check(max_new_tokens - 1)  # what ended since the last look


@dataclass
class Move:
    """Swap-remove's copies: slot movers[i] into slot holes[i], as host lists and device indices."""
    holes: list
    movers: list
    into: torch.Tensor
    source: torch.Tensor


def swap_plan(slot_rows: list, ended: set) -> tuple[list, list]:
    """Swap-remove, planned on the host: the slots of ended rows inside the new batch (holes) and
    the live slots beyond it that fill them (movers)."""
    b_new = sum(row not in ended for row in slot_rows)
    holes = [s for s in range(b_new) if slot_rows[s] in ended]
    movers = [s for s in range(b_new, len(slot_rows)) if slot_rows[s] not in ended]
    return holes, movers


class Watch:
    """When each row ends, as the host learns it, every `check_every` decode steps.

    The device records per row and step what kind of token the row drew (`kinds` [B, T], from a
    [V] table). A look copies the steps since the previous look to the host in one small transfer
    (with the token windows stop strings need), takes each row's first EOS, and decodes text only
    where a token may complete a stop string: rollout.StopRule's test on the same window of tokens,
    so the same rows end at the same steps as in the teaching core."""

    def __init__(self, table, stops: rollout.StopRule, out: rollout.Outputs, check_every: int):
        self.table, self.stops, self.out, self.check_every = table, stops, out, check_every
        self.kinds = torch.zeros(out.tokens.shape, dtype=torch.int8, device=table.device)  # [B, T]
        self.looked = 0  # the steps before this one have been looked at
        self.ended = set()  # the rows known to have ended

    def record(self, t: int, rows, tokens) -> None:
        self.kinds[rows, t] = self.table[tokens]

    def check(self, t: int) -> set:
        """Every row that ended up to step t (earlier looks included)."""
        if t < self.looked:
            return self.ended
        window = self.stops.window if self.stops.stop_strings else 0
        first = max(0, self.looked + 1 - window)  # the first token a window of these steps reads
        steps = t + 1 - self.looked
        block = self.kinds[:, self.looked:t + 1].long()  # [B, steps]
        if window:
            block = torch.cat([block, self.out.tokens[:, first:t + 1]], 1)  # [B, steps + tokens]
        host = to_host(block)
        kinds, tokens = host[:, :steps], host[:, steps:].tolist()
        where = kinds.nonzero()  # [n, 2]: row by row, each row's steps in order
        events = [(row, self.looked + k, kind) for (row, k), kind in
                  zip(where.tolist(), kinds[where[:, 0], where[:, 1]].tolist())
                  if row not in self.ended]
        # the text of every window that may end in a stop string, decoded in one call
        windows = [tokens[row][max(0, step + 1 - window) - first:step + 1 - first]
                   for row, step, kind in events if kind == MAYBE_STOP]
        hits = iter(self.stops.hits(windows) if windows else [])
        for row, step, kind in events:
            stop = kind == MAYBE_STOP and next(hits)
            if row not in self.ended and (kind == EOS or stop):
                self.end(row, step, "eos" if kind == EOS else "stop")
        self.looked = t + 1
        return self.ended

    def end(self, row: int, step: int, reason: str) -> None:
        self.ended.add(row)
        self.out.lengths[row] = step + 1
        self.out.finish_reason[row] = reason


def to_host(x: torch.Tensor) -> torch.Tensor:
    """One device-to-host copy; on CUDA into pinned memory, waited for on the copy's own stream."""
    if x.device.type != "cuda":
        return x.cpu()
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    host.copy_(x, non_blocking=True)
    torch.cuda.current_stream(x.device).synchronize()
    return host


# -------------------------------------------------------------------------------------------------
# The two decode steps
# -------------------------------------------------------------------------------------------------
class DynamicStep:
    """The dynamic step: the b live rows, attention over the filled slots from the first one a
    live row needs (it moves right as the rows with the longest prompts leave)."""

    def __init__(self, model, cache: rollout.KVCache, n_real, P: int, cpu_layout: bool):
        self.model, self.cache, self.P, self.cpu_layout = model, cache, P, cpu_layout
        S = cache.keys[0].shape[2]
        slots = torch.arange(S, device=n_real.device)  # [S]
        self.may_attend = slots[None, :] >= (P - n_real)[:, None]  # [B, S]
        self.prompt_len = n_real.tolist()  # per slot, on the host
        config = model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        self.kv_width = config.num_key_value_heads * head_dim  # numbers a cached token, K or V

    def __call__(self, tokens, positions, t: int) -> torch.Tensor:
        b, P = len(tokens), self.P
        lengths = self.prompt_len[:b]
        longest = max(lengths)
        lo = P - longest  # the left padding every live row shares is never read
        cache = rollout.KVCache([k[:b, :, lo:] for k in self.cache.keys],
                                [v[:b, :, lo:] for v in self.cache.values])
        start = P + t - lo  # the slot written, in the view
        padding_share = sum(longest - n for n in lengths) / (b * (start + 1))
        per_row = self.cpu_layout and padding_share > 0.25 and \
            (start + 1) * self.kv_width >= PER_ROW_MIN_NUMBERS
        if per_row:  # much padding, long rows: one call per row over its own slots
            mask = [longest - n for n in lengths]  # each row's first slot in the view
        else:
            mask = self.may_attend[:b, None, None, lo:P + t + 1]  # [b, 1, 1, span]
        attention = Attention(write_at(start), start + 1, mask, self.cpu_layout)
        return forward_last(self.model, tokens[:, None], positions[:, None], cache, attention)

    def move(self, move: Move, t: int) -> None:
        swap_cache_rows(self.cache, move, self.P + t)
        self.may_attend[move.into] = self.may_attend[move.source]
        for hole, mover in zip(move.holes, move.movers):
            self.prompt_len[hole] = self.prompt_len[mover]


class StaticDecode:
    """The static step as the decode loop calls it: the inputs written into the step's fixed
    buffers, then the step at the smallest batch size holding the live rows, over the filled slots
    rounded up (static_decode.StaticStep: a CUDA graph per shape on a GPU)."""

    def __init__(self, static: static_decode.StaticStep, cache: rollout.KVCache, P: int):
        self.static, self.cache, self.P = static, cache, P

    def __call__(self, tokens, positions, t: int) -> torch.Tensor:
        static, b, slot = self.static, len(tokens), self.P + t
        static.tokens[:b, 0] = tokens
        static.positions[:b, 0] = positions
        static.slot.fill_(slot)
        static.may_attend[:b, slot] = True
        span = static_decode.span_for(slot + 1, static.max_len)
        return static.run(static_decode.batch_size_for(b), span)  # [rows, V], rows :b live

    def move(self, move: Move, t: int) -> None:
        swap_cache_rows(self.cache, move, self.P + t)
        self.static.may_attend[move.into] = self.static.may_attend[move.source]


def swap_cache_rows(cache: rollout.KVCache, move: Move, filled: int) -> None:
    """Copy the movers' cache rows into the holes: their `filled` written slots only."""
    for k, v in zip(cache.keys, cache.values):
        k[move.into, :, :filled] = k[move.source, :, :filled]
        v[move.into, :, :filled] = v[move.source, :, :filled]


def fixed_step(model, cache: rollout.KVCache):
    """The static step's model_step (static_decode.StaticStep): one new token for each of the
    cache's first n rows, its keys and values written at the slot held in a tensor, attention over
    slots :span."""
    def model_step(tokens, positions, slot, mask, n: int, span: int) -> torch.Tensor:
        def write(layer_cache, new):  # [n, KV, S, d] <- [n, KV, 1, d] at `slot`, in place
            layer_cache.index_copy_(2, slot, new)

        rows = rollout.KVCache([k[:n] for k in cache.keys], [v[:n] for v in cache.values])
        return forward_last(model, tokens, positions, rows, Attention(write, span, mask))
    return model_step
