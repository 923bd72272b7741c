"""Few-shot training subsets: K images per class, chosen by a seed, so the choice can be recorded and repeated."""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np


def few_shot_indices(targets: Sequence[int], k: int, seed: int) -> dict[int, list[int]]:
    """{label: sorted indices of the K images kept} (all of a class's images when it has fewer than K).

    Each class draws from its own generator seeded by (seed, label), so a class's choice does not depend
    on which other classes the split holds; the same (targets, k, seed) always gives the same indices.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, t in enumerate(targets):
        by_class[int(t)].append(i)
    chosen = {}
    for label in sorted(by_class):
        idx = by_class[label]
        rng = np.random.default_rng([seed, label])
        pick = rng.choice(len(idx), size=min(k, len(idx)), replace=False)
        chosen[label] = sorted(idx[j] for j in pick)
    return chosen
