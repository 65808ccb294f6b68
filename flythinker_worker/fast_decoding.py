"""Fast paired decoding: static per-slot KV caches, one sync-free lock-step, on-device counter-based
sampling, CUDA graphs, continuous batching. Plain torch + transformers (DESIGN: no ray, no verl here).

What one step does (for every slot of the batch, no host synchronisation):
  reasoner:  x_t                                -> r_t      (kept for step t+1)
  generator: E_G[x_t] + lam * fit(r_{t-1})      -> logits for x_{t+1}
  sampler:   x_{t+1} from the logits with per-row counter-based noise; EOS / length tracked on device
The host only reads the `finished` flags every `sync_every` steps (1 on CPU, where a read costs nothing;
8 on CUDA), to stop early and (in `generate_many`) to hand a finished slot to the next prompt.

Caches. Each model gets one preallocated K and V tensor per layer, (slots, kv_heads, max_len, head_dim).
A row's cache starts at index 0 with its FIRST REAL token (left padding never enters it), and each row
writes at its own index (= its position id), so positions restart per row as DESIGN requires and a new
prompt can be prefilled into any free slot while the others keep decoding. Attention reads the slot's
indices <= its own position (a boolean mask), so nothing else in the batch is visible to a row.
The prompt prefill reuses the reference decoder's prefill (HF forward with a DynamicCache over the
left-padded prompt group); its K/V are shifted left per row into the static cache. The decode step is
our own loop over the HF decoder layers' submodules (norms, projections, MLP are the HF modules; only
the attention core is ours), for the Llama family: qwen2, qwen3, llama, mistral without sliding window,
static RoPE types. `unsupported_reason()` says why another model falls back to the reference decoder.

Seed contract: flythinker_worker.sampling (counter-based noise per row seed and sample index).
"""

from __future__ import annotations

import logging

import torch

from .cpu_overlap import HelperThread, stops_helper
from .decode_common import GenerateOutput, check_sampling, hf_prefill, left_pad
from .decode_session import Session, SessionKey, restore, snapshot
from .model import FlyThinker, Positions
from .packed_linear import PackedLM, packing_available
from .sampling import row_seed_tensor, sample_tokens
from .static_lm import _flash_attn_available, decode_layer, unsupported_reason

logger = logging.getLogger(__name__)


class FastPairedDecoder:
    """Static-cache, sync-free lock-step decoding of a `FlyThinker` (same outputs as `PairedDecoder`'s
    reference backend for greedy decoding; sampling follows the seed contract in flythinker_worker.sampling).

    `compile` (default: on CUDA) compiles a decoder layer and the sampler; `cuda_graph` (default: on CUDA)
    captures the whole step (reasoner + generator + sampler + state updates) as one CUDA graph and replays it;
    `overlap` (default: with a reasoner, on CUDA) runs the reasoner concurrently with the generator: on a
    side stream inside that graph, or on CPU (opt-in: slower on 2 cores) in a helper thread (cpu_overlap);
    `attention`: "sdpa", "flash" (flash-attn's kvcache kernel: CUDA, fp16/bf16) or "auto" (flash where it
    runs and imports, else sdpa); `sync_every`: steps between host reads of the finished flags (default 1
    on CPU, 8 on CUDA); `pack_weights` (default: on CPU in fp32 where oneDNN runs, eager only) multiplies by
    pre-packed weight copies (packed_linear: ~2-4x faster skinny GEMMs on CPU, one more copy of the weights)."""

    def __init__(self, model: FlyThinker, *, compile: bool | None = None, cuda_graph: bool | None = None,
                 overlap: bool | None = None, attention: str = "auto", sync_every: int | None = None,
                 compile_backend: str = "inductor", pack_weights: bool | None = None):
        self.model = model
        weight = model.generator.get_input_embeddings().weight
        self.device, self.dtype = weight.device, weight.dtype
        cuda = self.device.type == "cuda"
        self.compile = cuda if compile is None else compile
        self.compile_backend = compile_backend
        self.cuda_graph = cuda if cuda_graph is None else cuda_graph
        if self.cuda_graph and not cuda:
            raise ValueError("cuda_graph=True needs the model on a CUDA device")
        self.overlap = (cuda and self.reasoner_steps) if overlap is None else overlap
        self._helper = HelperThread("flythinker-reasoner")
        half = self.dtype in (torch.float16, torch.bfloat16)  # the only dtypes flash-attn takes
        if attention == "auto":
            attention = "flash" if cuda and half and _flash_attn_available() else "sdpa"
        if attention not in ("sdpa", "flash"):
            raise ValueError(f"attention must be auto, sdpa or flash, got {attention!r}")
        if attention == "flash" and not (cuda and half):
            raise ValueError(f"attention='flash' needs CUDA and fp16/bf16 weights (flash-attn), got "
                             f"{self.device.type} {self.dtype}")
        self.attention = attention
        self.sync_every = sync_every or (8 if cuda else 1)
        can_pack = self.device.type == "cpu" and not self.compile and attention == "sdpa" and \
            packing_available(self.dtype)
        if pack_weights and not can_pack:
            raise ValueError("pack_weights=True needs an eager (compile=False) fp32 model on a CPU with oneDNN")
        self.pack_weights = can_pack if pack_weights is None else pack_weights
        self._packed: dict[str, PackedLM] = {}
        self._session: Session | None = None
        self.scale = None
        self._side_stream, self._parts = None, None  # set per session by _build_step

    @property
    def reasoner_steps(self) -> bool:
        return self.model.uses_reasoner and self.model.positions is not Positions.INPUT_ONLY

    @staticmethod
    def supports(model: FlyThinker, max_len: int | None = None) -> str | None:
        """None when this decoder can run `model`, else the reason (the caller falls back)."""
        for name, lm in (("generator", model.generator), ("reasoner", model.reasoner)):
            if lm is None or (name == "reasoner" and not model.uses_reasoner):
                continue
            reason = unsupported_reason(lm, max_len)
            if reason:
                return f"{name}: {reason}"
        return None

    # ---- sessions and the step -------------------------------------------------------------------------

    def _session_for(self, key: SessionKey) -> Session:
        if self._session is not None and self._session.key == key:
            self._session.reset()
            return self._session
        if self._session is not None:  # free the old buffers and graph first (step_fn refers back to them)
            self._session.step_fn = self._session.graph = None
        self._session = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        session = Session(self, key, self.device, self.dtype)
        self._session = session
        return session

    def _advance(self, s: Session, logits: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Sample from logits (n, V) for `rows` (None: all slots) and update their state in place."""
        key = s.key
        take = (lambda t: t) if rows is None else (lambda t: t[rows])
        finished, counter = take(s.finished), take(s.counter)
        nxt = sample_tokens(logits, take(s.seeds), counter, key.temperature, key.top_k, key.top_p,
                            s.vocab_keys)
        column = torch.where(finished, key.max_new, counter)  # (n,); column max_new: the bin of done rows
        counter = counter + (~finished).long()
        done = finished | (nxt[:, None] == s.eos[None, :]).any(-1) | (counter >= s.limit)
        nxt = torch.where(finished, key.pad, nxt)
        # index_put writes: inductor compiles them in place (a scatter_ becomes a clone of the whole buffer)
        at = s.rows if rows is None else rows
        s.out[at, column] = nxt
        if s.logits is not None:
            s.logits[at, column] = logits.float()
        if rows is None:
            s.counter.copy_(counter)
            s.finished.copy_(done)
            s.tokens.copy_(nxt)
        else:
            s.counter[rows], s.finished[rows], s.tokens[rows] = counter, done, nxt

    def _reasoner_part(self, s: Session, kv_len: int | None = None) -> torch.Tensor:
        """x_t -> fit(r_t) for every slot (B, 1, d_G); writes the reasoner's K/V."""
        states = s.reasoner(s.reasoner.embed(s.tokens[:, None]), s.pos, kv_len)
        return self.model.latents(states, self.scale)

    def _generator_part(self, s: Session, kv_len: int | None = None) -> torch.Tensor:
        """E_G[x_t] + lam * fit(r_{t-1}) -> logits for x_{t+1} (B, V); writes the generator's K/V."""
        model = self.model
        embeds = model.generator.get_input_embeddings()(s.tokens[:, None])  # (B, 1, d_G)
        if s.reasoner is not None:
            # A generated token is a response token: global and output_only both gate it in.
            embeds = embeds + model.lam * s.latent.to(embeds.dtype)
        hidden = s.generator(embeds, s.pos, kv_len)  # (B, 1, d_G)
        head = s.generator.packed.lm_head if s.generator.packed is not None else model.generator.lm_head
        return head(hidden)[:, 0]

    def _post_part(self, s: Session, logits: torch.Tensor) -> None:
        # Finished (and idle) rows keep their position: they never run past the cache.
        s.pos.copy_(torch.where(s.finished, s.pos, s.pos + 1))
        self._advance(s, logits)

    def _step_impl(self, s: Session, kv_len: int | None = None) -> None:
        """One lock-step for every slot. The reasoner and the generator share no data inside a step (the
        generator reads fit(r_{t-1}) from s.latent, the reasoner produces fit(r_t)), so with `overlap`
        the reasoner runs concurrently: on a side stream inside a CUDA graph, in a helper thread on CPU."""
        reasoner, generator, post = self._parts
        side = self._side_stream
        if s.reasoner is None:
            new_latent, logits = None, generator(s, kv_len)
        elif side is not None:
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                new_latent = reasoner(s, kv_len)
            logits = generator(s, kv_len)
            torch.cuda.current_stream().wait_stream(side)
        elif self.overlap and self.device.type == "cpu":
            pending = self._helper.submit(reasoner, s, kv_len)
            try:
                logits = generator(s, kv_len)
            finally:
                pending.exception()  # wait, never raise: no reasoner cache write may outlive the step
            new_latent = pending.result()  # a reasoner error raises here
        else:
            new_latent, logits = reasoner(s, kv_len), generator(s, kv_len)
        if new_latent is not None:
            s.latent.copy_(new_latent)
        post(s, logits)

    def _build_step(self, s: Session):
        """The step as a callable(kv_len): eager, or with compiled units, and/or captured as one CUDA
        graph (reasoner + generator + sampler + state updates; the reasoner on a side stream when
        `overlap`)."""
        parts = (self._reasoner_part, self._generator_part, self._post_part)
        if self.compile:
            # Compiled units: one decoder layer (static_lm.decode_layer; one graph serves every layer of a
            # model, so compile time does not grow with depth) and the sampler + state update. The glue
            # (embedding lookups, the latent fit, the LM head) stays eager: under a CUDA graph it costs no
            # host time. Each model, session shape and sampling setting adds a compiled entry to the same
            # functions; past torch's default of 8 per function (process-wide) a fullgraph compile raises.
            if torch._dynamo.config.recompile_limit < 64:
                logger.info("raising torch._dynamo.config.recompile_limit to 64 for the decode step")
                torch._dynamo.config.recompile_limit = 64
            options = dict(backend=self.compile_backend, dynamic=False)
            layer_fn = torch.compile(decode_layer, fullgraph=self.attention == "sdpa", **options)
            for lm in (s.generator, s.reasoner):
                if lm is not None:
                    lm.layer_fn = layer_fn
            parts = parts[:2] + (torch.compile(self._post_part, fullgraph=True, **options),)
        self._parts = parts
        if not self.cuda_graph:
            return lambda kv_len: self._step_impl(s, None if self.compile else kv_len)
        saved = snapshot(s)
        # The side stream is used in warm-up too, so that its cuBLAS workspace exists before capture.
        self._side_stream = torch.cuda.Stream(self.device) if self.overlap else None
        warm = torch.cuda.Stream(self.device)
        warm.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(warm):
            for _ in range(3):  # compile, autotune, cuBLAS workspaces: before capture
                self._step_impl(s)
        torch.cuda.current_stream().wait_stream(warm)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step_impl(s)
        restore(s, saved)  # warm-up and capture ran real steps: put the state back
        s.graph = graph
        return lambda kv_len: graph.replay()

    # ---- prefill into slots -------------------------------------------------------------------------------

    @torch.no_grad()
    def _admit(self, s: Session, slots: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               seeds: torch.Tensor) -> None:
        """Prefill a left-padded prompt group into `slots` and sample each row's first token."""
        # The reference prefill: one HF forward per model over the left-padded group.
        logits, state = hf_prefill(self.model, input_ids, attention_mask)
        lengths = attention_mask.long().sum(-1)
        s.generator.load_prefill(state.generator_cache, slots, lengths)
        if s.reasoner is not None:
            s.reasoner.load_prefill(state.reasoner_cache, slots, lengths)
            s.latent[slots] = state.latent.to(s.latent.dtype)
        s.pos[slots] = lengths
        s.seeds[slots] = seeds
        s.counter[slots] = 0
        s.finished[slots] = False
        s.out[slots] = s.key.pad
        if s.logits is not None:
            s.logits[slots] = 0
        self._advance(s, logits, slots)

    def _prepare(self, key: SessionKey, max_new: int) -> Session:
        # s is recomputed every call (weights may have been replaced in place, e.g. a weight sync) and
        # copied into one tensor, whose address the captured graph keeps.
        from .model import embedding_scale

        scale = embedding_scale(self.model.generator)
        if self.scale is None or self.scale.device != scale.device:
            self.scale = scale.clone()
        else:
            self.scale.copy_(scale)
        session = self._session_for(key)
        session.limit.fill_(max_new)  # this call's length limit (the key's max_new may be rounded up)
        if self.pack_weights:
            self._repack()
            session.generator.packed = self._packed["generator"]
            if session.reasoner is not None:
                session.reasoner.packed = self._packed["reasoner"]
        return session

    def _repack(self) -> None:
        """(Re)build the packed weight copies when a parameter changed since they were made."""
        wanted = {"generator": (self.model.generator, True)}
        if self.reasoner_steps:
            wanted["reasoner"] = (self.model.reasoner, False)
        for name, (lm, head) in wanted.items():
            if name not in self._packed or self._packed[name].stale():
                self._packed[name] = PackedLM(lm, head)

    # ---- public API ---------------------------------------------------------------------------------------

    @stops_helper
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 seed: int | list[int] | None = None, output_logits: bool = False):
        """Same contract as `PairedDecoder.generate`. `seed`: a list gives row i seed[i]; one int gives row
        i the seed `seed + i`; None means 0 + i."""
        check_sampling(max_new_tokens, temperature, top_p, top_k)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        batch, width = input_ids.shape
        eos = tuple([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []))
        pad = int(eos[0]) if pad_token_id is None and eos else int(pad_token_id or 0)
        seeds = row_seed_tensor(seed, batch, input_ids.device)
        key = self._key(batch, width + max_new_tokens, temperature, top_k, top_p, eos, pad, max_new_tokens,
                        output_logits)
        s = self._prepare(key, max_new_tokens)
        self._admit(s, s.rows[:batch], input_ids.to(self.device), attention_mask.to(self.device), seeds.to(self.device))
        step = self._stepper(s)
        longest = int(attention_mask.long().sum(-1).max())
        for t in range(1, max_new_tokens):
            if t % self.sync_every == 0 and bool(s.finished[:batch].all()):
                break
            step(min(longest + t, key.max_len))
        # Steps run after every row finished (at most sync_every - 1) only wrote into the bin column.
        num_generated = s.counter[:batch].clone()
        n = int(num_generated.max())
        sequences = torch.cat([input_ids.to(self.device), s.out[:batch, :n]], dim=1)
        logits = s.logits[:batch, :n].clone() if output_logits else None
        return GenerateOutput(sequences=sequences, num_generated=num_generated, logits=logits)

    @stops_helper
    @torch.no_grad()
    def generate_many(self, prompts: list[list[int]], seeds: list[int], max_new_tokens: int = 256,
                      temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                      eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                      slots: int = 8, prefill_batch: int | None = None, bucket_ratio: float = 1.25
                      ) -> tuple[list[list[int]], dict]:
        """Continuous batching: generated ids per prompt (EOS included, no padding), in input order, and
        stats. `slots` rows decode at once; a row that finishes frees its slot and the next prompt (the
        queue is ordered longest first) is prefilled into it. Free slots are filled in prefill groups of
        at most `prefill_batch` prompts whose lengths are within `bucket_ratio` of the group's longest, so
        the prefill pads little. Each row's tokens equal `generate` of that row alone (seed contract)."""
        check_sampling(max_new_tokens, temperature, top_p, top_k)
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if not prompts:
            return [], {"steps": 0, "prefills": 0}
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt")
        eos = tuple([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []))
        pad = int(eos[0]) if pad_token_id is None and eos else int(pad_token_id or 0)
        slots = max(1, min(slots, len(prompts)))
        prefill_batch = prefill_batch or slots
        longest = max(len(p) for p in prompts)
        key = self._key(slots, longest + max_new_tokens, temperature, top_k, top_p, eos, pad, max_new_tokens,
                        False)
        s = self._prepare(key, max_new_tokens)
        n_slots = s.key.slots
        queue = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        results: list[list[int] | None] = [None] * len(prompts)
        owner: list[int | None] = [None] * n_slots  # prompt index held by each slot
        bound = [0] * n_slots  # host-known upper bound of each slot's position (for kv_len on CPU)
        free = list(range(slots))
        step = self._stepper(s)
        steps = prefills = 0
        while queue or any(o is not None for o in owner):
            while queue and free:
                group = [queue.pop(0)]
                while queue and len(group) < min(prefill_batch, len(free)) and \
                        len(prompts[group[0]]) <= bucket_ratio * len(prompts[queue[0]]):
                    group.append(queue.pop(0))
                targets = [free.pop(0) for _ in group]
                ids, mask = left_pad([prompts[i] for i in group], pad, self.device)
                self._admit(s, torch.tensor(targets, device=self.device), ids, mask,
                            torch.tensor([seeds[i] for i in group], device=self.device, dtype=torch.long))
                prefills += 1
                for slot, i in zip(targets, group):
                    owner[slot], bound[slot] = i, len(prompts[i])
            for _ in range(self.sync_every):
                step(min(max(bound) + 1, s.key.max_len))  # every fed position is < max(bound) + 1
                bound = [b + 1 if o is not None else b for b, o in zip(bound, owner)]
                steps += 1
            finished = s.finished.tolist()  # the one host read per sync_every steps
            done = [slot for slot, o in enumerate(owner) if o is not None and finished[slot]]
            if done:
                counts = s.counter.tolist()
                out = s.out[done].tolist()
                for row, slot in zip(out, done):
                    results[owner[slot]] = row[:counts[slot]]
                    owner[slot], bound[slot] = None, 0
                    free.append(slot)
                free.sort()
        return results, {"steps": steps, "prefills": prefills, "slots": slots}

    # ---- helpers ------------------------------------------------------------------------------------------

    def _key(self, slots, max_len, temperature, top_k, top_p, eos, pad, max_new, output_logits) -> SessionKey:
        if self.cuda_graph:  # round up so that graphs, compiled code and buffers are reused across calls
            slots = 1 << (slots - 1).bit_length()
            max_len = -(-max_len // 256) * 256
            if not output_logits:  # (the logits buffer is slots x max_new x vocab: never larger than asked)
                max_new = -(-max_new // 256) * 256
            if self._session is not None:  # grow, never shrink: alternating shapes would recapture each call
                old = self._session.key
                slots, max_len = max(slots, old.slots), max(max_len, old.max_len)
                max_new = max_new if output_logits else max(max_new, old.max_new)
        return SessionKey(slots, max_len, float(temperature), int(top_k), float(top_p), tuple(int(e) for e in eos),
                          int(pad), int(max_new), bool(output_logits), float(self.model.lam))

    def _stepper(self, s: Session):
        """A callable(kv_len) running one step; kv_len bounds the attended cache on the eager path."""
        if s.step_fn is None:
            s.step_fn = self._build_step(s)
        return s.step_fn
