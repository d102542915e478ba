"""BEiT-v2's objective with deep dynamic supervision: eq. 3 with cross-entropy as M.

BEiT-v2 predicts, at every masked position, the index the frozen VQ-KD
tokenizer gives that patch: cross-entropy over the 8192 codes, averaged over
the masked positions. DDS-BEiT-v2 (section 4.3, Table 2) applies the shared
prediction head to the supervised blocks g_1 < ... < g_K and weights each
block's per-patch cross-entropy with its dynamic weights h_beta_i (eq. 2):

  L_mim = sum_i lambda_i h_beta_i(m) ⊙ CE(head(f^(g_i)(x)), tokens)          (eq. 3, M = CE)

plus eq. 6's regulariser. With one block and uniform weights this is exactly
BEiT-v2's loss. Layouts here hold the masked positions only: [B, K, M].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_ids(mask: jax.Array, num_masked: int) -> jax.Array:
  """int32[B, M]: the masked patches of each row in raster order (M static)."""
  return jnp.argsort(~mask, axis=-1, stable=True)[:, :num_masked].astype(jnp.int32)


def gather_patches(x: jax.Array, ids: jax.Array) -> jax.Array:
  """x[b, ..., ids[b, m], :] for x [B, K, N, C] or [B, K, N] and ids [B, M] -> [B, K, M(, C)]."""
  index = ids[:, None, :, None] if x.ndim == 4 else ids[:, None, :]
  return jnp.take_along_axis(x, index, axis=2)


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """-log softmax(logits)[target] per position: [B, K, M, V] x int[B, M] -> float32[B, K, M]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, targets[:, None, :, None], axis=-1)
  return -picked[..., 0]


def token_accuracy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """float32[K]: how often each block's arg-max code equals the target."""
  hits = jnp.argmax(logits, axis=-1) == targets[:, None, :]
  return jnp.mean(hits.astype(jnp.float32), axis=(0, 2))
