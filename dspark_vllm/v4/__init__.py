"""DeepSeek-V4 DSpark: the drafter that ships inside a V4 target checkpoint as ``mtp.{0,1,2}.*``.

Pure PyTorch (no vLLM import): ``config.py`` reads the draft fields of the target's config,
``layers.py`` holds the V4 block pieces (single-latent attention with sinks, MoE, mHC),
``drafter.py`` the drafter itself, ``loader.py`` finds, reads and writes ``mtp.*`` in a target
folder, ``target.py`` runs a transformers V4 target in the reference decoder (exact rollback by
replay).
"""

from .config import V4DraftConfig, is_deepseek_v4_config
from .drafter import DSparkV4Drafter
from .loader import load_v4_drafter

__all__ = ["DSparkV4Drafter", "V4DraftConfig", "is_deepseek_v4_config", "load_v4_drafter"]
