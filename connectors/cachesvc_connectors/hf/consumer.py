"""Consumer side: reuse cached chunks of the same model or of another model of the family.

For a prompt of N tokens the consumer looks up its chunks, picks a producer and a plan,
and assembles a cache for the first N-1 tokens; ``generate()`` then runs the last prompt
token and decodes as usual, with the user's sampling settings.

Assembly runs layer by layer while the plan's slabs stream in (loader.SlabLoader):

- a reused layer takes the producer's K/V for the n cached tokens, then the consumer runs
  its own layer on the uncached suffix tokens, which attend to that prefix;
- a recompute group [a, b) starts from the producer's E at layer a for the cached tokens,
  followed by the suffix's own hidden state, and runs the consumer's layers a..b-1 over
  all of them; the group's K/V are the consumer's own, and the hidden state leaving the
  group carries the suffix on.

With the plan that recomputes every layer this is exactly the consumer's full prefill
(E at layer 0 is the embedding output). A slab that is missing or fails its checksum
makes the consumer use only the leading chunks that arrived whole, and recompute the
rest; it never uses bytes that did not verify.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from cachesvc.wire.keys import NO_MODEL, DType, Kind, ModelId
from cachesvc_client import CacheClient, CacheServiceError, Hit, LookupResult
from cachesvc_connectors.hf.calibrate import calibrate
from cachesvc_connectors.hf.decoder import DecoderStack
from cachesvc_connectors.hf.family import FamilyMismatchError, register
from cachesvc_connectors.hf.loader import ArenaLoader, SlabLoader, Staging, open_loader, plan_requests
from cachesvc_connectors.hf.verify import AnswerVerifier
from cachesvc_connectors.metrics import default_metrics
from cachesvc_connectors.reuse import Choice, CostModel, DriftGuard, DriftOptions, Plan, PlanPolicy, PlanSelector


DIRECT_LEASE_S = 30
"""How long a GPU consumer's located hit is held at most (released once its copies ran)."""


@dataclass(frozen=True)
class ConsumerOptions:
    # How plans are chosen (reuse.planner, where the same fields make a PlanPolicy).
    # Plans for producers other than this model, by producer model id; else the plan the
    # pair's profile in the service's registry names (the fewest recomputed layers whose
    # measured quality reaches ``min_quality``); else ``default_plan``. A producer with
    # none is not used: the consumer recomputes rather than reuse unprofiled.
    plans: Mapping[str, Plan] = field(default_factory=dict)
    use_profiles: bool = True
    min_quality: float = 0.95         # identical-answer rate to the consumer's own prefill
    default_plan: Plan | None = None
    # With a TTFT target the planner picks, among the profile's frontier plans that reach
    # min_quality and the full prefill, the best quality predicted to meet it (reuse.planner);
    # ``cost`` is calibrated on this host when not given.
    ttft_target_s: float | None = None
    cost: CostModel | None = None
    drift: DriftOptions | None = None  # check a sample of cross-model answers (reuse.drift)
    producers: Sequence[str] = ()     # consider only these producers (checked: same family)
    dtype: DType = DType.BFLOAT16     # slab dtype of the family (as the producers stored)
    transport: str | None = None      # data-plane path; None = the client's default
    pipelined: bool = True            # compute while later slabs load
    # On the node's host, read hits straight out of its memory tier (one lookup that
    # locates them, no fetch request; loader.ArenaLoader); else fetch over the data plane.
    direct: bool = True
    # Record every prefill in the process's Prometheus metrics (cachesvc_connectors.metrics).
    metrics: bool = True
    # The weights digest to register under; None = the in-memory digest (see ProducerOptions).
    weights_digest: str | None = None


@dataclass(frozen=True, slots=True)
class Selection:
    """Which hit and plan a prefill uses; ``hit`` None: recompute, ``why`` says why."""

    hit: Hit | None
    plan: Plan | None
    why: str = ""
    predicted_ttft_s: float | None = None   # the planner's prediction, with a TTFT target


@dataclass
class ReuseReport:
    """What a prefill reused and what it cost. Times in seconds."""

    mode: str = "prefill"             # "same_model", "cross_model" or "prefill" (nothing reused)
    producer: ModelId = NO_MODEL
    plan: str = ""
    prompt_tokens: int = 0
    reused_tokens: int = 0            # prefix tokens taken from the producer
    suffix_tokens: int = 0            # prompt tokens after them run here (the last one excluded)
    recomputed_layers: int = 0
    bytes_fetched: int = 0
    fetch_s: float = 0.0              # the loader's wall time
    wait_s: float = 0.0               # time compute waited for slabs
    hidden_fraction: float = 0.0      # share of fetch_s overlapped with compute
    prefill_s: float = 0.0            # lookup + load + assembly (to a cache of N-1 tokens)
    # Where prefill_s went (issue 12's breakdown; host time, launches on a GPU):
    lookup_s: float = 0.0             # hashing and the service's lookup(s)
    choose_s: float = 0.0             # picking the hit and the plan (profile reads on first use)
    fetch_setup_s: float = 0.0        # the loader built and started (staging, request plan)
    first_slab_s: float = 0.0         # loader start to the first slab in hand
    assembly_s: float = 0.0           # assembling the cache, waits for slabs excluded
    suffix_s: float = 0.0             # the suffix through the reused layers (recompute groups not included)
    recompute_s: float = 0.0          # the recompute groups over every token
    transport: str = ""
    fallback: str = ""                # why less (or nothing) was reused
    predicted_ttft_s: float | None = None   # the planner's prediction, with a TTFT target


@dataclass
class Prefill:
    cache: DynamicCache               # holds the first N-1 prompt tokens
    report: ReuseReport
    plan: Plan | None = None          # the plan used, when something was reused


class Consumer:
    """Answers prompts with ``model``, reusing cached chunks where a plan allows. One
    prefill runs at a time (they share the staging buffers); use one consumer per thread
    for concurrency."""

    def __init__(self, client: CacheClient, model, tokenizer, model_id: ModelId,
                 options: ConsumerOptions = ConsumerOptions()) -> None:
        self.client, self.model, self.model_id, self.options = client, model, model_id, options
        self.stack = DecoderStack(model)
        self.registration = register(client, model, tokenizer, model_id, options.dtype, options.weights_digest)
        self.family_id = self.registration.family_id
        self._check_producers(options.producers)
        self._staging = Staging(pinned=self.stack.device.type == "cuda")
        self._direct = options.direct and self._same_host()
        self._lock = threading.Lock()
        self._suffix_s = 0.0              # of the assembly in progress (host time: launches on a GPU)
        self._recompute_s = 0.0
        self.cost = options.cost
        if self.cost is None and options.ttft_target_s is not None:
            self.cost = calibrate(self.stack, self.registration.family)
        verifier = AnswerVerifier(self)
        self.guard = DriftGuard(verifier, verifier.flag, options.drift) if options.drift is not None else None
        policy = PlanPolicy(options.plans, options.use_profiles, options.min_quality, options.default_plan,
                            options.ttft_target_s)
        self.selector = PlanSelector(client, model_id, policy, self.cost, self.guard)
        self.metrics = default_metrics() if options.metrics else None
        if self.metrics is not None and self.guard is not None:
            self.metrics.track(self.guard)

    def _check_producers(self, producers: Sequence[str]) -> None:
        """Refuse, by name, a producer registered under another family."""
        for model in self.client.list_models():
            if model["model_id"] in producers and model["family_id"] != self.family_id:
                raise FamilyMismatchError(
                    f"producer {model['model_id']!r} is of family {model['family_id'][:12]} and "
                    f"consumer {self.model_id!r} of family {self.family_id[:12]}: their caches are "
                    f"not shareable (architecture, shapes, RoPE, tokenizer or slab dtype differ)")

    @property
    def direct(self) -> bool:
        """Whether hits are read straight out of the node's memory tier (same host)."""
        return self._direct

    def _same_host(self) -> bool:
        """Whether this consumer reaches the node's memory tier over shm."""
        try:
            return self.client.arena(transport=self.options.transport) is not None
        except CacheServiceError:
            return False   # the data plane is unreachable now: fetch (or recompute) instead

    # ------------------------------------------------------------------ choice

    def choose(self, result: LookupResult, prompt_tokens: int = 0) -> Selection:
        """The hit and plan to use, longest usable hit first: this model's own entries
        reuse every layer; another producer's need a plan (reuse.planner). Hits are cut to
        the leading chunks that hold every slab the plan needs."""
        why, predicted = [], None
        for hit in sorted(result.hits, key=lambda h: (-h.num_tokens, not h.same_model)):
            if self.options.producers and hit.producer not in self.options.producers:
                continue
            if hit.same_model or hit.producer == self.model_id:
                plan = Plan.full_reuse(self.stack.num_layers)
            else:
                choice = self.plan_for(hit.producer, hit.num_tokens, prompt_tokens)
                predicted = choice.predicted_ttft_s if choice.predicted_ttft_s is not None else predicted
                if choice.plan is None:
                    why.append(choice.why)
                    continue
                plan = choice.plan
            hit = _usable_prefix(hit, plan)
            if hit.num_chunks:
                return Selection(hit, plan, "", predicted)
            why.append(f"{hit.producer!r} lacks slabs the plan {plan.describe()} needs")
        return Selection(None, None, "; ".join(why) or "no cached chunks", predicted)

    def plan_for(self, producer: ModelId, cached_tokens: int = 0, prompt_tokens: int = 0) -> Choice:
        """The plan for reusing ``producer``'s entries (``Choice.plan`` None: recompute,
        ``Choice.why`` says why)."""
        return self.selector.choose(producer, cached_tokens, prompt_tokens)

    def profile_version(self, producer: ModelId) -> int:
        """The version of the pair's profile this consumer last read (0: none)."""
        read = self.selector.last_read(producer)
        return read.version if read is not None else 0

    # ------------------------------------------------------------------ prefill

    @torch.no_grad()
    def prefill(self, input_ids: Sequence[int] | torch.Tensor) -> Prefill:
        """A cache of the first N-1 tokens of the prompt, reusing what a plan allows."""
        t0 = time.perf_counter()
        ids = input_ids.reshape(-1).tolist() if torch.is_tensor(input_ids) else list(map(int, input_ids))
        if len(ids) < 2:
            raise ValueError("a prompt needs at least 2 tokens")
        report = ReuseReport(prompt_tokens=len(ids))
        result = self._lookup(ids)
        try:
            t1 = time.perf_counter()
            selection = self.choose(result, len(ids))
            report.lookup_s, report.choose_s = t1 - t0, time.perf_counter() - t1
            hit, plan, report.fallback = selection.hit, selection.plan, selection.why
            if selection.predicted_ttft_s is not None:
                report.predicted_ttft_s = round(selection.predicted_ttft_s, 4)
            cache = None
            if hit is not None and plan is not None:
                with self._lock:
                    cache = self._reuse(ids, hit, plan, report)
        finally:
            self._release(result.lease_id)
        if cache is None:
            cache = self.stack.new_cache()
            self.model.model(input_ids=self.stack.ids(ids[:-1]), past_key_values=cache, use_cache=True)
            report.mode, report.reused_tokens, report.recomputed_layers = "prefill", 0, self.stack.num_layers
            plan = None
        report.prefill_s = time.perf_counter() - t0
        if self.cost is not None and plan is not None:   # learn this host's fixed costs from its traffic
            self.cost.observe_reuse(plan, report.reused_tokens, report.suffix_tokens, report.prefill_s)
        if self.metrics is not None:
            self.metrics.observe(report)
        return Prefill(cache, report, plan)

    @torch.no_grad()
    def prefill_with(self, ids: Sequence[int], producer: ModelId, plan: Plan) -> Prefill | None:
        """A prefill reusing ``producer``'s entries under ``plan`` (the drift guard's check);
        None when they are no longer there whole."""
        ids = list(ids)
        report = ReuseReport(prompt_tokens=len(ids))
        result = self._lookup(ids, [producer])
        try:
            hits = [h for h in result.hits if h.producer == producer]
            hit = _usable_prefix(max(hits, key=lambda h: h.num_tokens), plan) if hits else None
            if hit is None or not hit.num_chunks:
                return None
            with self._lock:
                cache = self._reuse(ids, hit, plan, report)
            return Prefill(cache, report, plan) if cache is not None else None
        finally:
            self._release(result.lease_id)

    def _lookup(self, ids: list[int], producers: Sequence[str] = ()) -> LookupResult:
        """The service's hits for the prompt, up to where a stored context ends (mid-chunk
        too); located when the consumer reads the node's memory tier directly. On a GPU
        they are also leased: a DMA from the arena is verified before it is issued, so
        the entries must stay put until it has run (released by :meth:`_release`)."""
        lease = DIRECT_LEASE_S if self._direct and self.stack.device.type == "cuda" else 0
        return self.client.lookup_prompt(self.family_id, ids, consumer=self.model_id, producers=producers,
                                         locate=self._direct, lease_ttl_s=lease)

    def _release(self, lease_id: str) -> None:
        """End a lookup's lease once the device copies out of the arena have run."""
        if not lease_id:
            return
        torch.cuda.current_stream(self.stack.device).synchronize()
        try:
            self.client.unpin(lease_id)
        except CacheServiceError:
            pass   # it expires by itself

    def _reuse(self, ids: list[int], hit: Hit, plan: Plan, report: ReuseReport) -> DynamicCache | None:
        t0 = time.perf_counter()
        loader = self._loader(hit, plan)
        if self.options.pipelined:
            loader.start()
        report.fetch_setup_s = time.perf_counter() - t0
        if not self.options.pipelined:
            loader.run()
        n = min(hit.num_tokens, len(ids) - 1)   # the last prompt token runs in generate()
        t1, waited = time.perf_counter(), loader.wait_s
        cache = self._assemble(ids, n, plan, loader)
        report.assembly_s = time.perf_counter() - t1 - (loader.wait_s - waited)
        valid = loader.join()
        report.first_slab_s = loader.first_slab_s
        report.bytes_fetched, report.fetch_s = loader.bytes_fetched, loader.fetch_s
        if self.cost is not None:
            self.cost.observe_load(loader.bytes_fetched, loader.fetch_s)
        report.wait_s, report.hidden_fraction = loader.wait_s, loader.hidden_fraction
        report.transport = loader.transport_used
        if valid < hit.num_chunks:
            report.fallback = "; ".join(loader.errors) or "a load came back short"
            if valid == 0:
                return None
            # The slabs of the leading `valid` chunks verified: assemble again from those
            # (already in memory), and recompute the rest with the suffix.
            n = min(n, sum(layout.num_tokens for layout in hit.layouts[:valid]))
            cache = self._assemble(ids, n, plan, loader)
        if cache is None:
            return None
        report.mode = "same_model" if plan.recomputed_layers == 0 and \
            (hit.same_model or hit.producer == self.model_id) else "cross_model"
        report.producer, report.plan = hit.producer, plan.describe()
        report.reused_tokens, report.recomputed_layers = n, plan.recomputed_layers
        report.suffix_tokens, report.suffix_s = len(ids) - 1 - n, self._suffix_s
        report.recompute_s = self._recompute_s
        return cache

    def _loader(self, hit: Hit, plan: Plan) -> SlabLoader | ArenaLoader:
        return open_loader(self.client, self.registration.family, self.family_id, hit, plan_requests(plan),
                           direct=self._direct, transport=self.options.transport, device=self.stack.device,
                           staging=self._staging)

    def _assemble(self, ids: list[int], n: int, plan: Plan, loader: SlabLoader) -> DynamicCache | None:
        """Layer by layer: the producer's K/V for reused layers, the consumer's own layers
        over [E; suffix] for recompute groups; the suffix (tokens n..N-2) through every
        layer. None if a slab it needs never arrived."""
        cache = self.stack.new_cache()
        dtype = self.stack.dtype
        suffix = self.stack.embed(self.stack.ids(ids[n:-1])) if len(ids) - 1 > n else None
        self._suffix_s = self._recompute_s = 0.0
        layer = 0
        while layer < self.stack.num_layers:
            group = plan.group_at(layer)
            if group is not None:
                start, stop = group
                entering = loader.wait(Kind.E, start)
                if entering is None:
                    return None
                hidden = entering[:n].to(dtype).unsqueeze(0)
                if suffix is not None:
                    hidden = torch.cat([hidden, suffix], dim=1)
                t0 = time.perf_counter()
                hidden = self.stack.run(hidden, start, stop, 0, cache)
                self._recompute_s += time.perf_counter() - t0
                suffix = hidden[:, n:] if suffix is not None else None
                layer = stop
                continue
            keys, values = loader.wait(Kind.K, layer), loader.wait(Kind.V, layer)
            if keys is None or values is None:
                return None
            append_layer(cache, layer, keys[:n], values[:n], dtype)
            if suffix is not None:
                t0 = time.perf_counter()
                suffix = self.stack.run(suffix, layer, layer + 1, n, cache)
                self._suffix_s += time.perf_counter() - t0
            layer += 1
        return cache

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, input_ids: Sequence[int] | torch.Tensor, **generate_kwargs) -> tuple[torch.Tensor, ReuseReport]:
        """``model.generate`` over the prompt with the assembled cache; returns the full
        sequences (prompt included, as ``generate`` does) and the reuse report."""
        ids = input_ids.reshape(1, -1).to(self.stack.device) if torch.is_tensor(input_ids) \
            else self.stack.ids(input_ids)
        pre = self.prefill(ids[0])
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  past_key_values=pre.cache, **generate_kwargs)
        if self.guard is not None and pre.report.mode == "cross_model" and pre.plan is not None:
            expected, ladder = self.selector.expectation(pre.report.producer, pre.plan)
            self.guard.observe(ids[0].tolist(), pre.report.producer, pre.plan, expected, ladder)
        return out, pre.report


def append_layer(cache, layer: int, keys: torch.Tensor, values: torch.Tensor, dtype: torch.dtype) -> None:
    """Append token-major slabs ``[tokens, kv_heads, head_dim]`` to ``cache``'s ``layer``
    as ``dtype``, in one pass over the bytes where the slabs' dtype widens to it (bf16
    slabs, an fp32 model). ``DynamicCache.update`` copies what it is given (see
    :func:`head_major`), and a first update sets the layer's dtype: so a zero-length
    update of ``dtype`` comes first, and the concatenation converts as it copies
    (torch.cat promotes) instead of copying a converted copy: 10-36 against 19-73 ms for
    30 layers of 2048 tokens × 3 × 64 on this VM (a whole same-model prefill: 3-9%
    faster, median of 10). A narrowing (fp32 slabs, a bf16 model) is converted first,
    as before: promotion would widen the cache."""
    if keys.dtype != dtype and torch.promote_types(keys.dtype, dtype) == dtype:
        empty = keys.new_empty((1, keys.shape[1], 0, keys.shape[2]), dtype=dtype)
        cache.update(empty, empty, layer)
        dtype = keys.dtype   # the cache's concatenation converts
    cache.update(head_major(keys, dtype), head_major(values, dtype), layer)


def head_major(slab: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Token-major ``[tokens, kv_heads, head_dim]`` as the cache's ``[1, kv_heads, tokens,
    head_dim]``: a view, since ``DynamicCache.update`` copies what it is given (it
    concatenates onto its empty start), which also keeps the cache out of the staging
    buffers the next prefill reuses (test_a_cache_outlives_the_next_prefill_of_its_consumer)."""
    return slab.to(dtype).transpose(0, 1).unsqueeze(0)


def _usable_prefix(hit: Hit, plan: Plan) -> Hit:
    """The leading chunks of ``hit`` that hold every slab the plan needs."""
    needs = {kind: set(layers) for kind, layers in plan.needs().items()}
    keep = 0
    for layout in hit.layouts:
        if any(not layers <= set(layout.layers(kind)) for kind, layers in needs.items()):
            break
        keep += 1
    return hit[:keep]
