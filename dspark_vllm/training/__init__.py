"""Drafter training (paper §4 / DeepSpec recipe) in plain PyTorch: data regeneration with the
target, cached target features, anchor sampling, the DSpark loss, and a resumable trainer."""
