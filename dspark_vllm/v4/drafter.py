"""The DeepSeek-V4 DSpark drafter: V4 stages with mHC over a block, the generic DSpark heads.

Round structure, as :class:`~dspark_vllm.drafter.DSparkDrafter` (whose context caches, draft
vocabulary, sampling and fused kernel it reuses):

1. context: target features from ``dspark_target_layer_ids`` (each layer's output averaged over
   its hc streams, concatenated) are fused as main_x = ``main_norm(main_proj(.))`` and every
   stage projects its own context K=V from the same main_x: ``kv_norm(wkv_s(main_x))``, RoPE at
   the token's position;
2. block: [anchor, MASK x (B-1)] at positions p..p+B-1, embedded, expanded to ``hc_mult``
   streams, through the stages (each block query sees the last ``sliding_window`` context
   positions before the anchor and the whole block), collapsed by the hc head to the pre-norm
   head hidden h; base logits U = lm_head(norm(h));
3. heads: the vanilla Markov head samples left to right; the confidence head (no bias) reads
   [h; W1[prev]] with the *pre-norm* h.

The drafter has no embedding of its own: the target's embedding and LM head are bound at load.
"""

from __future__ import annotations

from fnmatch import fnmatch

import torch
from torch import nn

from ..context_cache import INITIAL_CAPACITY, ContextKVCache, ContextView
from ..drafter import DSparkDrafter
from ..heads import ConfidenceHead, build_markov_head
from ..paged_context import PagedContextPool
from .config import V4DraftConfig
from .layers import HyperHead, InterleavedRotary, RMSNorm, V4Block

CONTEXT_KV_HEADS = 1  # V4 attention reads one shared K=V head
# Parameters vLLM keeps in float32 whatever the serving dtype: the mHC mixers (their Sinkhorn
# normalisation and sigmoid gates amplify rounding), the router's correction bias (a rounded
# bias can flip a top-k expert choice), the attention sinks and the confidence head.
FLOAT32_PARAMS = ("layers.*.attn_hc.*", "layers.*.ffn_hc.*", "hc_head.*", "layers.*.ffn.gate.bias",
                  "layers.*.attn.attn_sink", "confidence_head.*")


class DSparkV4Drafter(DSparkDrafter):
    """DSpark drafter of a DeepSeek-V4 target (parameter names as the checkpoint's ``mtp.*``)."""

    def __init__(self, config: V4DraftConfig) -> None:
        super().__init__(config)
        self.embeddings_bound = False  # the target's embedding and LM head are bound at load

    def _apply(self, fn, recurse: bool = True):
        """Casts (``.to(torch.bfloat16)``...) leave :data:`FLOAT32_PARAMS` in float32, unrounded;
        device moves apply to them as to everything else."""
        keep = {id(p) for name, p in self.named_parameters() if any(fnmatch(name, pat) for pat in FLOAT32_PARAMS)}

        def cast(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if id(t) in keep and out.dtype != torch.float32:
                return t.to(device=out.device, dtype=torch.float32)
            return out

        return super()._apply(cast, recurse)

    @torch.no_grad()
    def bind_target_embeddings(self, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor) -> None:
        """Use the target's input embedding and LM head, shared rather than copied where device
        and dtype already match (at V4 scale a copy costs about 1 GB each per rank). Rows beyond
        the drafter's vocabulary are dropped."""
        v, h = self.config.vocab_size, self.config.hidden_size
        for module, src in ((self.embed_tokens, embed_weight), (self.lm_head, lm_head_weight)):
            if src.shape[0] < v or src.shape[1] != h:
                raise ValueError(f"target embedding of shape {tuple(src.shape)} cannot serve a drafter with "
                                 f"vocab {v} and hidden {h}")
            module.weight = nn.Parameter(src.detach()[:v].to(self.device, self.dtype), requires_grad=False)
        self.embeddings_bound = True
        self._draft_weights = None  # gathered draft-vocabulary rows are stale now

    def _build_modules(self, config: V4DraftConfig) -> None:
        h, v = config.hidden_size, config.vocab_size
        self.embed_tokens = nn.Embedding(v, h)
        self.layers = nn.ModuleList(V4Block(config) for _ in range(config.num_layers))
        self.main_proj = nn.Linear(len(config.target_layer_ids) * h, h, bias=False)
        self.main_norm = RMSNorm(h, config.rms_norm_eps)
        self.hc_head = HyperHead(config)
        self.norm = RMSNorm(h, config.rms_norm_eps)
        self.lm_head = nn.Linear(h, v, bias=False)
        self.markov_head = build_markov_head("vanilla", v, config.markov_rank, h)
        self.confidence_head = None
        if config.enable_confidence_head:
            self.confidence_head = ConfidenceHead(h + config.markov_rank, bias=False)
        self.rotary_emb = InterleavedRotary(config.rope_head_dim, config.rope_theta)

    # ---- shapes ---------------------------------------------------------------------------
    @property
    def context_proj(self) -> nn.Linear:
        return self.main_proj

    def new_cache(self, batch: int, capacity: int = INITIAL_CAPACITY) -> ContextKVCache:
        return ContextKVCache(len(self.layers), batch, CONTEXT_KV_HEADS, self.config.head_dim, self.device,
                              self.dtype, capacity)

    def context_bytes_per_token(self) -> int:
        return PagedContextPool.bytes_per_token(len(self.layers), CONTEXT_KV_HEADS, self.config.head_dim, self.dtype,
                                                shared_kv=True)

    def new_pool(self, num_slots: int) -> PagedContextPool:
        """K = V in V4: the pool stores the one tensor once."""
        return PagedContextPool(len(self.layers), num_slots, CONTEXT_KV_HEADS, self.config.head_dim, self.device,
                                self.dtype, shared_kv=True)

    # ---- context --------------------------------------------------------------------------
    def target_features(self, features: torch.Tensor) -> torch.Tensor:
        """Aux hidden states given per hc stream ([S, m*hc*H]) are averaged over the streams;
        already averaged ones ([S, m*H]) pass through."""
        m, hc, h = len(self.config.target_layer_ids), self.config.hc_mult, self.config.hidden_size
        if features.shape[-1] == m * hc * h:
            return features.view(*features.shape[:-1], m, hc, h).float().mean(-2).flatten(-2).to(features.dtype)
        return super().target_features(features)

    def fuse_context(self, target_hidden: torch.Tensor) -> torch.Tensor:
        return self.main_norm(self.main_proj(target_hidden.to(self.dtype)))

    @torch.no_grad()
    def project_context(self, target_hidden: torch.Tensor,
                        positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per stage (k, v) [S, 1, d] with k = v (K and V are one tensor in V4)."""
        main_x = self.fuse_context(target_hidden)
        cos, sin = self.rotary_emb(positions.to(self.device))
        out = []
        for layer in self.layers:
            kv = layer.attn.project_kv(main_x, cos, sin)[:, None]
            out.append((kv, kv))
        return out

    # ---- block ----------------------------------------------------------------------------
    def _forward_view(self, anchor: torch.Tensor, view: ContextView, depth: int) -> torch.Tensor:
        """Pre-norm head hidden h [N, D, H] (what the confidence head reads)."""
        x = self.embed_tokens(self.block_input_ids(anchor, depth))
        positions = view.positions.to(x.device)[:, None] + torch.arange(depth, device=x.device)[None, :]
        cos, sin = self.rotary_emb(positions)
        upto = view.mask.shape[1]
        mask = self._window(view.mask)
        streams = x.unsqueeze(-2).expand(-1, -1, self.config.hc_mult, -1).contiguous()
        for i, layer in enumerate(self.layers):
            streams = layer(streams, cos, sin, view.keys[i][:, 0, :upto], mask)
        return self.hc_head(streams)

    @property
    def context_window(self) -> int:
        return self.config.sliding_window

    def packed_block_hidden(self, context: torch.Tensor, context_pos: torch.Tensor, block_ids: torch.Tensor,
                            block_pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        main_x = self.fuse_context(context)
        cos_c, sin_c = self.rotary_emb(context_pos.to(self.device))
        cos_b, sin_b = self.rotary_emb(block_pos.to(self.device))
        x = self.embed_tokens(block_ids).to(self.dtype)
        streams = x.unsqueeze(-2).expand(-1, -1, self.config.hc_mult, -1).contiguous()
        for layer in self.layers:
            streams = layer(streams, cos_b, sin_b, layer.attn.project_kv(main_x, cos_c, sin_c), mask)
        return self.hc_head(streams)

    def save_trained(self, out) -> None:
        """``out`` gets the stages as ``mtp.*`` (and the target's config.json if it has none):
        :func:`~dspark_vllm.v4.loader.save_v4_drafter` installs them into a target folder."""
        from .loader import save_v4_drafter

        save_v4_drafter(self, out)

    def load_trained(self, out) -> None:
        from .loader import read_stages

        self.load_state_dict(read_stages(out), strict=False)

    def _window(self, mask: torch.Tensor) -> torch.Tensor:
        """Keep the last ``sliding_window`` valid context positions of each row (valid positions
        are a prefix of the row, oldest first, in both the dense and the paged context)."""
        count = mask.sum(dim=1, keepdim=True)
        offsets = torch.arange(mask.shape[1], device=mask.device)[None, :]
        return mask & (offsets >= count - self.config.sliding_window)

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """U = lm_head(norm(h)): the stages return the pre-norm head hidden."""
        return self.norm(hidden)
