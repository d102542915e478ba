"""Fig. 2: masks and their distance maps at several masking ratios and kinds."""

from __future__ import annotations

import jax
import numpy as np

from ddae_jax.objectives.dynamic_weights import distance_map
from ddae_jax.objectives.masking import make_mask

# Jitted: run op by op, the blockwise mask's while loop costs seconds per ratio.
_mask = jax.jit(lambda key, grid, ratio, kind: make_mask(key, 1, grid, ratio, kind),
                static_argnums=(1, 2, 3))
_distance = jax.jit(distance_map, static_argnums=1)


def distance_map_panels(grid: tuple[int, int], ratios, kinds, seed: int = 0) -> list[dict]:
  """One mask per (kind, ratio) and its distance map, as Fig. 2 shows them.

  Every panel draws its mask from the same key, so the panels of one kind
  differ only by the ratio.

  Args:
    grid: (rows, cols) of the patch grid (ViT-B/16 at 224 px: (14, 14)).
    ratios: masking ratios in (0, 1), e.g. (0.5, 0.75, 0.9).
    kinds: masking kinds, "blockwise" and/or "random".

  Returns:
    [{"kind", "ratio", "mask": bool[rows, cols], "distance": float32[rows, cols]
    (patches), "normalized": distance / its max, in [0, 1] as in Fig. 2}] in
    kind-major order.
  """
  panels = []
  for kind in kinds:
    for ratio in ratios:
      mask = _mask(jax.random.key(seed), tuple(grid), float(ratio), kind)
      distance = np.asarray(_distance(mask, tuple(grid)))[0].reshape(grid)
      panels.append({"kind": kind, "ratio": float(ratio),
                     "mask": np.asarray(mask)[0].reshape(grid), "distance": distance,
                     "normalized": distance / max(float(distance.max()), 1e-12)})
  return panels
