"""Forward hooks that keep the outputs of chosen decoder layers of a transformers model.

The drafter's context features are raw outputs of target layers. ``output_hidden_states``
gives most of them, but some models hand the *normed* final output in place of the last
layer's (DeepSeek-V4), and V4's layers carry ``hc_mult`` residual streams ([B, S, hc, H]),
which the drafter reads averaged. A hook on each layer sees exactly its output.
"""

from __future__ import annotations

import torch


class LayerTaps:
    """Outputs of ``model.model.layers[i]`` (``embed_tokens`` for i = -1) for i in ``layer_ids``
    from the latest forward."""

    def __init__(self, model: torch.nn.Module, layer_ids: list[int]) -> None:
        self.layer_ids = list(layer_ids)
        self._out: dict[int, torch.Tensor] = {}
        inner = model.model
        # id -1 is the embedding output (DeepSpec's convention), id t the output of layer t
        modules = {i: inner.embed_tokens if i == -1 else inner.layers[i] for i in self.layer_ids}
        self._handles = [module.register_forward_hook(self._hook(i)) for i, module in modules.items()]

    def _hook(self, i: int):
        def keep(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            self._out[i] = out.mean(dim=-2) if out.dim() == 4 else out  # [B, S, hc, H] -> [B, S, H]
        return keep

    def features(self) -> torch.Tensor:
        """[B, S, m*H]: the tapped layers' outputs, concatenated in ``layer_ids`` order."""
        if not self.layer_ids:
            raise ValueError("no target layers to tap")
        return torch.cat([self._out[i] for i in self.layer_ids], dim=-1)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
