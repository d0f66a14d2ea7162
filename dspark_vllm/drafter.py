"""The DSpark drafter as a plain ``torch.nn.Module`` (no vLLM import).

Round structure (inference):
1. ``add_context`` / ``project_context``: fuse newly verified target hidden states from the
   listed layers, H_ctx = hidden_norm(fc([h^(l1); ...; h^(lm)])), and project them to every
   layer's K/V: appended to a dense :class:`ContextKVCache` (reference decoder), or written to
   a :class:`PagedContextPool` at the target's slot numbers (vLLM).
2. ``propose``: run the block [anchor, MASK x (B-1)] at positions p_anchor + j through the layers
   (non-causal inside the block, all cached context visible), get h_0..h_{B-1} and base logits
   U_k = lm_head(h_k) (soft-capped for Gemma4), then sample left to right through the Markov head
   and score each position with the confidence head.

Parameter names equal the DeepSpec checkpoint tensor names (see docs/architecture.md, *Checkpoints*).
"""

from __future__ import annotations

import torch
from torch import nn

from .backbone import DSparkDecoderLayer, build_rotary, rotary_cos_sin
from .drafter_config import DSparkConfig
from .context_cache import INITIAL_CAPACITY, ContextKVCache, ContextView
from .paged_context import PagedContextPool, PagedContextView
from .heads import ConfidenceHead, build_markov_head
from .sampling import SEED_LIMIT, DraftBlock, is_greedy, sample_block


class DSparkDrafter(nn.Module):
    """DSpark draft model: context fusion, draft layers, Markov head, confidence head."""

    def __init__(self, config: DSparkConfig) -> None:
        super().__init__()
        self.config = config
        self.family = config.family
        # False for a checkpoint saved with shared embeddings until the target's are bound.
        self.embeddings_bound = True
        # Optional draft vocabulary (target ids the drafter may propose); None = all V tokens.
        self.draft_vocab: torch.Tensor | None = None
        self._draft_weights: tuple | None = None
        self._build_modules(config)

    def _build_modules(self, config: DSparkConfig) -> None:
        """The backbone and heads of this drafter family (a subclass builds its own)."""
        hf = config.backbone_hf_config()
        self.hf_config = hf
        h, v = config.hidden_size, config.vocab_size
        if self.family == "gemma4":
            from transformers.models.gemma4.modeling_gemma4 import (
                Gemma4RMSNorm as Norm,
                Gemma4TextScaledWordEmbedding,
            )

            self.embed_tokens = Gemma4TextScaledWordEmbedding(v, h, None, embed_scale=float(h) ** 0.5)
        else:
            from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm as Norm

            self.embed_tokens = nn.Embedding(v, h)
        eps = hf.rms_norm_eps
        self.layers = nn.ModuleList(DSparkDecoderLayer(hf, self.family, i, config.attention_dims()) for i in range(config.num_layers))
        self.norm = Norm(h, eps=eps)
        self.fc = nn.Linear(len(config.target_layer_ids) * h, h, bias=False)
        self.hidden_norm = Norm(h, eps=eps)
        self.lm_head = nn.Linear(h, v, bias=False)
        self.markov_head = build_markov_head(config.markov_head_type, v, config.markov_rank, h)
        self.confidence_head = None
        if config.enable_confidence_head:
            extra = config.markov_rank if config.confidence_head_with_markov else 0
            self.confidence_head = ConfidenceHead(h + extra)
        self.rotary_emb = build_rotary(hf, self.family)

    def _apply(self, fn, recurse: bool = True):
        """Keep the rotary tables' frequencies in float32 whatever dtype the drafter moves to.

        ``drafter.to(torch.bfloat16)`` would otherwise round inv_freq to bf16, and the rounding
        error in the frequency grows with the position, so long contexts drift away from the
        float32 drafter. DeepSpec's models keep these buffers in float32 too; cos/sin are still
        cast to the activations' dtype when applied."""
        rotary = getattr(self, "rotary_emb", None)
        saved = {} if rotary is None else {n: b for n, b in rotary._buffers.items()
                                           if b is not None and b.is_floating_point()}
        super()._apply(fn, recurse)
        for name, before in saved.items():
            after = rotary._buffers[name]
            rotary._buffers[name] = before.to(device=after.device, dtype=torch.float32)
        return self

    @torch.no_grad()
    def bind_target_embeddings(self, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor) -> None:
        """Copy the target's input embedding and LM head (the drafter's frozen shared weights).

        Rows beyond the drafter's vocabulary (padding some engines add) are dropped."""
        v = self.config.vocab_size
        for dst, src in ((self.embed_tokens.weight, embed_weight), (self.lm_head.weight, lm_head_weight)):
            if src.shape[0] < v or src.shape[1] != dst.shape[1]:
                raise ValueError(f"target embedding of shape {tuple(src.shape)} cannot serve a drafter with "
                                 f"vocab {v} and hidden {dst.shape[1]}")
            dst.copy_(src[:v].to(dst.device, dst.dtype))
        self.embeddings_bound = True
        self._draft_weights = None  # gathered draft-vocabulary rows are stale now

    def set_draft_vocab(self, token_ids: torch.Tensor | list[int] | None) -> None:
        """Draft only from ``token_ids`` (e.g. the K most frequent answer tokens); None = all.

        Why: at small scale the drafter's cost is its LM head over B positions x V logits per
        request, which can exceed the target's own step. Restricting the softmax to K ids
        divides that cost by V/K. Verification is unchanged, so output stays
        exactly the target's; a token outside the set just cannot be drafted (q puts no mass there).
        """
        if token_ids is None:
            self.draft_vocab, self._draft_weights = None, None
            return
        ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size:
            raise ValueError(f"draft vocabulary ids must be non-empty and in [0, {self.config.vocab_size})")
        if ids.unique().numel() != ids.numel():
            raise ValueError("draft vocabulary ids must be distinct")
        self.draft_vocab, self._draft_weights = ids, None

    def _draft_vocab_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(ids, LM-head rows, W2 rows, W1 rows) of the draft vocabulary, gathered once per
        weight set (gathering them per step costs more than the small GEMMs that use them)."""
        head = self.lm_head.weight
        w1 = self.markov_head.markov_w1.weight if self.markov_head is not None else None
        w2 = self.markov_head.markov_w2.weight if self.markov_head is not None else None
        key = (head.data_ptr(), head.device, head.dtype, None if w2 is None else w2.data_ptr(),
               None if w1 is None else w1.data_ptr(), self.embeddings_bound)
        if self._draft_weights is None or self._draft_weights[0] != key:
            ids = self.draft_vocab.to(head.device)
            self._draft_weights = (key, ids, head[ids].contiguous(), None if w2 is None else w2[ids].contiguous(),
                                   None if w1 is None else w1[ids].contiguous())
        return self._draft_weights[1:]

    # ---- shapes ---------------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def context_proj(self) -> nn.Linear:
        """The projection fusing the m target layers' features (its weight sets device and dtype)."""
        return self.fc

    @property
    def device(self) -> torch.device:
        return self.context_proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.context_proj.weight.dtype

    @property
    def context_width(self) -> int:
        """Width m*H of the concatenated target features one context token takes."""
        return self.context_proj.in_features

    def new_cache(self, batch: int, capacity: int = INITIAL_CAPACITY) -> ContextKVCache:
        attn = self.layers[0].self_attn
        return ContextKVCache(len(self.layers), batch, attn.num_kv_heads, attn.head_dim,
                              self.device, self.dtype, capacity)

    def context_bytes_per_token(self) -> int:
        """Draft context K/V of one token over all draft layers (what a pool slot costs)."""
        attn = self.layers[0].self_attn
        return PagedContextPool.bytes_per_token(len(self.layers), attn.num_kv_heads, attn.head_dim, self.dtype)

    def new_pool(self, num_slots: int) -> PagedContextPool:
        attn = self.layers[0].self_attn
        return PagedContextPool(len(self.layers), num_slots, attn.num_kv_heads, attn.head_dim, self.device, self.dtype)

    # ---- context ---------------------------------------------------------------------------
    def target_features(self, features: torch.Tensor) -> torch.Tensor:
        """The engine's aux hidden states [S, width] as this drafter's context input [S, m*H]."""
        if features.shape[-1] != self.context_width:
            raise ValueError(f"the target hands {features.shape[-1]} feature channels per token but this drafter "
                             f"fuses {self.context_width} ({len(self.config.target_layer_ids)} layers x "
                             f"{self.config.hidden_size}); is the drafter trained for this target?")
        return features

    def fuse_context(self, target_hidden: torch.Tensor) -> torch.Tensor:
        """[..., m*H] concatenated target layer outputs -> [..., H] fused context H_ctx."""
        return self.hidden_norm(self.fc(target_hidden.to(self.dtype)))

    @torch.no_grad()
    def add_context(self, cache: ContextKVCache, target_hidden: torch.Tensor, counts: torch.Tensor,
                    rows: torch.Tensor | None = None) -> None:
        """Append verified positions to each request's context.

        target_hidden [N, T, m*H] (rows padded), counts [N] real rows per request. Their absolute
        positions continue each request's context (cache.lengths + j). ``rows`` selects which
        cache rows the N entries belong to (default: all rows, in order). Only the real rows are
        projected (see :meth:`add_context_packed`), so padding costs nothing.
        """
        t = target_hidden.shape[1]
        if t == 0:
            return
        counts = counts.to(target_hidden.device).long()
        valid = torch.arange(t, device=target_hidden.device)[None, :] < counts[:, None]
        self.add_context_packed(cache, target_hidden[valid], counts, rows)

    @torch.no_grad()
    def add_context_packed(self, cache: ContextKVCache, target_hidden: torch.Tensor, counts: torch.Tensor,
                           rows: torch.Tensor | None = None) -> None:
        """Append verified positions given back to back: target_hidden [S, m*H] holds counts[0]
        positions of the first request, then counts[1] of the next, ... (S = counts.sum()).

        Why packed: an engine step mixes one-token decodes with long prefills; padding every
        request to the longest would project mostly padding through fc and the K/V layers."""
        counts = counts.long()
        total = target_hidden.shape[0]
        if total == 0:
            return
        if int(counts.sum()) != total:
            raise ValueError(f"add_context_packed: counts sum to {int(counts.sum())} but {total} positions were given")
        _, positions = cache.packed_slots(counts, rows)
        cache.append_packed(self.project_context(target_hidden, positions), counts, rows)

    @torch.no_grad()
    def project_context(self, target_hidden: torch.Tensor,
                        positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Context K/V of S tokens: target_hidden [S, m*H] at absolute ``positions`` [S] ->
        per draft layer (k, v), each [S, n_kv, d]."""
        ctx = self.fuse_context(target_hidden)[None]  # [1, S, H]
        cos, sin = rotary_cos_sin(self.rotary_emb, self.family, ctx, positions[None, :].to(self.device))
        layer_kv = []
        for layer in self.layers:
            k, v = layer.self_attn.project_kv(ctx, cos, sin)  # [1, n_kv, S, d]
            layer_kv.append((k[0].transpose(0, 1), v[0].transpose(0, 1)))
        return layer_kv

    # ---- block -----------------------------------------------------------------------------
    def block_input_ids(self, anchor: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        ids = torch.full((anchor.shape[0], depth or self.block_size), self.config.mask_token_id,
                         dtype=torch.long, device=anchor.device)
        ids[:, 0] = anchor
        return ids

    def check_depth(self, depth: int | None) -> int:
        """``depth`` (None = the trained block size) validated against 1..block_size."""
        if depth is None:
            return self.block_size
        if not 1 <= int(depth) <= self.block_size:
            raise ValueError(f"draft depth must be in 1..{self.block_size} (the trained block size), got {depth}")
        return int(depth)

    def forward_block(self, anchor: torch.Tensor, context: ContextKVCache | ContextView | PagedContextView,
                      depth: int | None = None) -> torch.Tensor:
        """Final-normed hidden states h [N, D, H] for the block [anchor, MASK x (D-1)].

        D defaults to the trained block size B. A shorter block (D < B) drafts only the first D
        positions at about D/B of the cost; they attend to fewer MASK positions than in training,
        which is why the draft gate chooses D from measured acceptance, not from the cost alone.
        A paged context is drafted in chunks of requests (see :meth:`PagedContextView.chunks`);
        a dense cache drafts every row in place."""
        depth = self.check_depth(depth)
        if isinstance(context, PagedContextView):
            parts = [self._forward_view(anchor[rows], view, depth) for rows, view in context.chunks(depth)]
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        if isinstance(context, ContextKVCache):
            # Slots past the longest row are free: the block's K/V go there in place.
            upto = int(context.lengths.max()) if context.batch else 0
            context = context.view(spare=depth if context.capacity >= upto + depth else 0)
        return self._forward_view(anchor, context, depth)

    def _forward_view(self, anchor: torch.Tensor, view: ContextView, depth: int) -> torch.Tensor:
        x = self.embed_tokens(self.block_input_ids(anchor, depth))
        positions = view.positions.to(x.device)[:, None] + torch.arange(depth, device=x.device)[None, :]
        cos, sin = rotary_cos_sin(self.rotary_emb, self.family, x, positions)
        upto = view.mask.shape[1]
        in_place = view.spare >= depth and view.keys[0].dtype == x.dtype
        end = upto + depth if in_place else upto
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, view.keys[i][:, :, :end], view.values[i][:, :, :end], view.mask, in_place)
        return self.norm(x)

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the LM head reads from the backbone's output (here the output itself, already
        normed; a drafter whose backbone returns pre-norm states normalises here)."""
        return hidden

    @property
    def context_window(self) -> int | None:
        """How many context positions before the anchor a block sees (None: all of them)."""
        return None

    def packed_block_hidden(self, context: torch.Tensor, context_pos: torch.Tensor, block_ids: torch.Tensor,
                            block_pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Training forward of packed blocks: context features [S, T, m*H] at context_pos [S, T],
        block tokens block_ids [S, L] at block_pos [S, L], mask [S, L, T + L] (which context and
        block slots each block token sees). Returns what :meth:`forward_block` returns per token,
        [S, L, H], so a block equals its inference forward over the context its mask allows."""
        ctx = self.fuse_context(context)
        cos_c, sin_c = rotary_cos_sin(self.rotary_emb, self.family, ctx, context_pos)
        x = self.embed_tokens(block_ids).to(self.dtype)
        cos_b, sin_b = rotary_cos_sin(self.rotary_emb, self.family, x, block_pos)
        for layer in self.layers:
            ck, cv = layer.self_attn.project_kv(ctx, cos_c, sin_c)
            x = layer(x, cos_b, sin_b, ck, cv, mask)
        return self.norm(x)

    def save_trained(self, out) -> None:
        """Write the trained drafter to ``out`` in its checkpoint format (shared embeddings left out)."""
        from .checkpoint import save_checkpoint

        save_checkpoint(self, out, shared_embeddings=True)

    def load_trained(self, out) -> None:
        """Load what :meth:`save_trained` wrote (training resume)."""
        from .checkpoint import load_weights_into

        load_weights_into(self, out)

    def base_logits(self, hidden: torch.Tensor, vocab: torch.Tensor | None = None,
                    head_rows: torch.Tensor | None = None) -> torch.Tensor:
        """U_k = lm_head(h_k) in fp32 for the backbone's output h (see :meth:`lm_logits`)."""
        return self.lm_logits(self.head_input(hidden), vocab, head_rows)

    def lm_logits(self, x: torch.Tensor, vocab: torch.Tensor | None = None,
                  head_rows: torch.Tensor | None = None) -> torch.Tensor:
        """The shared LM head on x in fp32; Gemma4 soft-caps here, before the Markov bias is added.
        ``vocab`` restricts the logits to those token ids (training on a vocabulary subset);
        ``head_rows`` are those rows of the LM head already gathered (the draft vocabulary).
        Also the target's own logits from its final normed hidden state (training teacher)."""
        if head_rows is None and vocab is not None:
            head_rows = self.lm_head.weight[vocab]
        logits = self.lm_head(x).float() if head_rows is None else (x @ head_rows.t()).float()
        return self._soft_cap(logits)

    def _soft_cap(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.config.final_logit_softcapping if self.family == "gemma4" else None
        return torch.tanh(logits / cap) * cap if cap else logits

    @property
    def can_fuse_sampling(self) -> bool:
        """The fused kernel covers the vanilla Markov head (and its confidence head)."""
        head = self.markov_head
        conf_ok = self.confidence_head is None or self.config.confidence_head_with_markov
        return head is not None and head.head_type == "vanilla" and conf_ok

    @torch.no_grad()
    def propose(self, anchor: torch.Tensor, cache: ContextKVCache | ContextView | PagedContextView,
                temperature: torch.Tensor, generator: torch.Generator | None = None, fused: bool = False,
                seeds: torch.Tensor | None = None, depth: int | None = None,
                all_greedy: bool | None = None) -> DraftBlock:
        """Draft one block per request. anchor [N]: last committed token (not yet in context).
        ``depth`` D <= B drafts only the first D positions (tokens [N, D]; see :meth:`forward_block`).

        fused=True samples through ``dspark_vllm.kernels.markov_sample`` (Triton on CUDA, the
        PyTorch reference elsewhere) when the head allows; gated and RNN heads always use the
        PyTorch loop. Either way, given per-request ``seeds`` [N] a row's draft is Gumbel-max with
        noise that is a pure function of its seed (the same noise on both paths). With a draft vocabulary (see
        :meth:`set_draft_vocab`) logits cover only those ids; tokens come back as target ids and
        ``probs`` as full-vocabulary rows (zero outside the set). ``all_greedy`` says whether every
        temperature is 0 when the caller knows it from host data (else one device check)."""
        if not self.embeddings_bound:
            raise RuntimeError("this drafter shares the target's embeddings (dspark_shared_embeddings); "
                               "call bind_target_embeddings() or load it with target=<the HF model>")
        anchor = anchor.to(self.device)
        temperature = temperature.to(self.device)
        if all_greedy is None:
            all_greedy = bool(is_greedy(temperature).all())
        hidden = self.forward_block(anchor, cache, depth)
        if self.draft_vocab is None:
            base = self.base_logits(hidden)
            if fused and self.can_fuse_sampling:
                return self._propose_fused(base, hidden, anchor, temperature, generator, seeds, all_greedy)
            return sample_block(base, hidden, anchor, temperature, self.markov_head, self.confidence_head,
                                self.config.confidence_head_with_markov, generator, greedy_all=all_greedy, seeds=seeds)
        ids, head_rows, w2_rows, w1_rows = self._draft_vocab_weights()
        base = self.base_logits(hidden, head_rows=head_rows)
        if fused and self.can_fuse_sampling:
            block = self._propose_fused(base, hidden, anchor, temperature, generator, seeds, all_greedy,
                                        (ids, w2_rows, w1_rows))
        else:
            block = sample_block(base, hidden, anchor, temperature, self.markov_head, self.confidence_head,
                                 self.config.confidence_head_with_markov, generator, vocab=ids, greedy_all=all_greedy,
                                 seeds=seeds)
        if block.probs is not None:
            full = block.probs.new_zeros(*block.probs.shape[:-1], self.config.vocab_size)
            full[..., ids] = block.probs
            block = DraftBlock(tokens=block.tokens, probs=full, confidence_logits=block.confidence_logits)
        return block

    def _propose_fused(self, base, hidden, anchor, temperature, generator, seeds, all_greedy: bool,
                       subset=None) -> DraftBlock:
        """Fused sampling. With ``subset`` = (ids [K], W2 rows [K, r], W1 rows [K, r]) the kernel
        works in subset index space: W1 is extended by the anchors' rows (anchor n -> index K + n),
        and sampled subset indices are mapped back to target ids."""
        from .kernels.markov_reference import markov_draft_probs
        from .kernels.markov_sampling import markov_sample

        if seeds is None:
            seeds = torch.randint(0, SEED_LIMIT, (anchor.shape[0],), generator=generator)
        head = self.markov_head
        conf = self.confidence_head
        w1, w2 = head.markov_w1.weight, head.markov_w2.weight
        prev0 = anchor
        if subset is not None:
            ids, w2, w1_rows = subset
            w1 = torch.cat([w1_rows, w1[anchor]])
            prev0 = ids.numel() + torch.arange(anchor.shape[0], device=anchor.device)
        tokens, _, conf_logits = markov_sample(
            base, w1, w2, prev0, temperature, seeds.to(self.device),
            hidden if conf is not None else None,
            conf.proj.weight.view(-1) if conf is not None else None,
            conf.bias_or_zero() if conf is not None else None, all_greedy=all_greedy)
        probs = None
        if not all_greedy:
            probs = markov_draft_probs(base, w1, w2, prev0, tokens, temperature)
        if subset is not None:
            tokens = subset[0][tokens]
        return DraftBlock(tokens=tokens, probs=probs, confidence_logits=conf_logits)
