"""One home for the correction configs the tests run through every layer (core, trainer, REST, gRPC).

Each case is one of the corrections of docs/corrections.md, with thresholds that mask some but not
all tokens of the test batches (FP8-like noise plus a few far-off tokens).
"""

from __future__ import annotations

from typing import Any

CORRECTION_CASES: dict[str, dict[str, Any]] = {
    "snis-token": {"mode": "tis", "self_normalize": True},
    "snis-sequence-capped": {"mode": "tis", "level": "sequence", "cap": 5.0, "self_normalize": True},
    "icepop": {"mode": "tis", "cap": None, "mask_ratio_lo": 0.8, "mask_ratio_hi": 1.25},
    "icepop-low-only": {"mode": "tis", "mask_ratio_lo": 0.9},
    "reject-token-k3": {"mode": "tis", "reject_rule": "token_k3", "reject_threshold": 0.005},
    "reject-token-k1": {"mode": "none", "reject_rule": "token_k1", "reject_threshold": 0.1},
    "reject-seq-sum-k2": {"mode": "tis", "reject_rule": "seq_sum_k2", "reject_threshold": 3.0},
    "reject-seq-mean-k1": {"mode": "tis", "level": "geometric", "reject_rule": "seq_mean_k1", "reject_threshold": 0.1},
    "token-tis-seq-max-k3": {"mode": "tis", "cap": 2.0, "reject_rule": "seq_max_k3", "reject_threshold": 1.0},
    "m2po": {"mode": "none", "m2po_threshold": 0.002},
    "ais-icepop": {"mode": "ais", "tau_kl": 0.01, "mask_ratio_lo": 0.8, "mask_ratio_hi": 1.25},
    "mis-plus-icepop-low": {"mode": "mis", "cap": 1.3, "mask_ratio_lo": 0.5},
    "ais-reject-snis": {"mode": "ais", "tau_kl": 0.01, "reject_rule": "seq_mean_k3", "reject_threshold": 0.2,
                        "self_normalize": True},
    "fixed-m2po-veto": {"mode": "fixed", "fixed_alpha": 0.4, "m2po_threshold": 0.002, "veto_threshold": 0.05},
}  # fmt: skip
