"""Which attention shapes jax's cuDNN path takes on this GPU (evidence for attention.refusal).

  python launch/cudnn_probe.py [OUT_DIR]

For every sequence length of the shipped configs, with and without a bias, as
forward only and as forward + backward: jax.nn.dot_product_attention(...,
implementation="cudnn") in bfloat16 on [2, T, 12, 64], compiled and run. Prints
one JSON line per case ("ok" or the error jax raised) and writes jax's own
check (check_is_flash_attention and the rules that call it) beside them.
"""

import inspect
import json
import os
import sys

import jax
import jax.numpy as jnp

out = sys.argv[1] if len(sys.argv) > 1 else "."


def attend(q, b):
  return jax.nn.dot_product_attention(q, q, q, bias=b, implementation="cudnn")


def loss(q, b):
  return attend(q, b).astype(jnp.float32).sum()


rows = []
for tokens in (50, 196, 197, 198, 17, 65):
  for bias in (False, True):
    for trained in (False, True):
      q = jnp.ones((2, tokens, 12, 64), jnp.bfloat16)
      b = jnp.zeros((1, 12, tokens, tokens), jnp.bfloat16) if bias else None
      try:
        if trained:
          jax.block_until_ready(jax.jit(jax.grad(loss))(q, b))
        else:
          jax.block_until_ready(jax.jit(attend)(q, b))
        result = "ok"
      except Exception as e:  # noqa: BLE001  # the refusal is the finding
        result = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
      rows.append({"tokens": tokens, "bias": bias, "trained": trained, "result": result})
      print(json.dumps(rows[-1]), flush=True)
from jax._src.cudnn import fused_attention_stablehlo as fa  # noqa: E402
from jax._src.lib import cuda_versions  # noqa: E402

with open(os.path.join(out, "cudnn_probe.json"), "w") as fh:
  cudnn = cuda_versions.cudnn_get_version() if cuda_versions else None
  json.dump({"jax": jax.__version__, "cudnn": cudnn,
             "device": str(jax.devices()[0].device_kind), "rows": rows}, fh, indent=1)
with open(os.path.join(out, "cudnn_checks.py.txt"), "w") as fh:
  for name in ("check_is_flash_attention", "_dot_product_attention_fwd",
               "_dot_product_attention_fwd_rule", "_dot_product_attention_bwd_rule",
               "dot_product_attention"):
    if hasattr(fa, name):
      fh.write(inspect.getsource(getattr(fa, name)) + "\n\n")
  fh.write(inspect.getsource(jax.nn.dot_product_attention))
