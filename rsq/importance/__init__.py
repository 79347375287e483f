"""Per-token importance weights (spec §3) and dataset expansion by cyclic rolls (spec §5).

Pure tensor functions; the layer plumbing is in :mod:`rsq.importance.layer` (not imported here).
"""

from rsq.importance.strategies import (
    STRATEGIES,
    ImportanceContext,
    Strategy,
    attention_received,
    attention_received_naive,
    cap_weights,
    chunk_mask,
    compute_weights,
    expand_rolls,
    get_strategy,
    register_strategy,
    rolled_window,
    strategy_needs,
    to_weights,
)

__all__ = [
    "STRATEGIES",
    "ImportanceContext",
    "Strategy",
    "attention_received",
    "attention_received_naive",
    "cap_weights",
    "chunk_mask",
    "compute_weights",
    "expand_rolls",
    "get_strategy",
    "register_strategy",
    "rolled_window",
    "strategy_needs",
    "to_weights",
]
