r"""Compiles the KAIST-AILab MaskedAutoencoder-Jax MAE step for a TPU slice, as ddae_jax.aot
does ours.

The peer of BENCHMARKS.md's "MAE ViT-B vs the float32 peer" row. Its code is
fetched at run time into peers/ (ignored by git), never committed here:

  git clone https://github.com/KAIST-AILab/MaskedAutoencoder-Jax peers/MaskedAutoencoder-Jax
  python launch/peer_mae_aot.py --peer=peers/MaskedAutoencoder-Jax --topology=v5e-4 --batch=256

The peer's step is `jax.pmap`ped; its body runs here under `jax.shard_map`
over the slice's compile-only devices (one "batch" axis, the state replicated,
the batch split), which is what pmap compiles to on one slice. Its model is
built with the arguments of its ViT-B/16 pretraining script
(config/pretrain/pretrain-vit-b16-224-in1k-1600ep.sh: 12 x 768 encoder,
8 x 512 decoder with 16 heads, sin-cos positions, AdamW (0.9, 0.95), no
gradient accumulation), plus --norm-pix-loss, the MAE recipe our
configs/mae_vitb.py follows. It computes in float32, as shipped.

Prints one JSON line with the same fields as `python -m ddae_jax.aot` where
they apply (per-chip memory, the cost model's FLOPs and bytes per image,
FLOP/byte, collectives).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddae_jax.perf import aot


def _import_peer(src: str):
  """The peer's pretraining module, its data and checkpoint imports stubbed out."""
  sys.path.insert(0, src)
  # dataset.py pulls torch, torchvision and webdataset for its loaders; the
  # step only reads its two constants (timm's ImageNet mean and std).
  dataset = types.ModuleType("dataset")
  dataset.IMAGENET_DEFAULT_MEAN = np.array([0.485, 0.456, 0.406])
  dataset.IMAGENET_DEFAULT_STD = np.array([0.229, 0.224, 0.225])
  sys.modules["dataset"] = dataset
  sys.modules.setdefault("webdataset", types.ModuleType("webdataset"))
  # The peer calls jax.tree_map, which jax 0.6 removed; it is jax.tree.map.
  if not hasattr(jax, "tree_map"):
    jax.tree_map = jax.tree.map
  import pretraining  # noqa: E402  (the peer's module, from `src`)
  return pretraining


def peer_args(batch: int) -> argparse.Namespace:
  """The peer's ViT-B/16 pretraining arguments (its shipped script) + norm-pix loss."""
  return argparse.Namespace(
      layers=12, dim=768, heads=12, labels=0, layerscale=False, patch_size=16,
      image_size=224, posemb="sincos2d", pooling="cls", dropout=0.0, droppath=0.0,
      grad_ckpt=False, image_mask_ratio=0.75, dec_layers=8, dec_dim=512, dec_heads=16,
      dec_layerscale=False, dec_posemb="sincos2d", dec_dropout=0.0, dec_droppath=0.0,
      norm_pix_loss=True, init_seed=0, mixup_seed=0, dropout_seed=0, noise_seed=0,
      optimizer="adamw", learning_rate=1.5e-4, weight_decay=0.05, adam_b1=0.9,
      adam_b2=0.95, adam_eps=1e-8, lr_decay=1.0, clip_grad=0.0, grad_accum=1,
      warmup_steps=1000, training_steps=10000, train_batch_size=batch)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--peer", required=True, help="checkout of MaskedAutoencoder-Jax")
  parser.add_argument("--topology", default="v5e-4")
  parser.add_argument("--batch", type=int, default=256, help="global batch")
  args = parser.parse_args()

  pretraining = _import_peer(os.path.join(args.peer, "src"))
  s = aot.parse_slice(args.topology)
  devices = aot.slice_devices(s)
  mesh = jax.sharding.Mesh(devices, ("batch",))
  with jax.default_device(jax.devices("cpu")[0]):
    state = pretraining.create_train_state(peer_args(args.batch))
  replicated = NamedSharding(mesh, P())
  # Its step counters are Python ints in the state; pmap would replicate them as int32.
  abstract_state = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a), sharding=replicated),
      state)
  images = jax.ShapeDtypeStruct((args.batch, 3, 224, 224), jnp.uint8,
                                sharding=NamedSharding(mesh, P("batch")))
  body = pretraining.training_step.__wrapped__  # the function pmap wraps
  step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P("batch")),
                               out_specs=(P(), P()), check_vma=False), donate_argnums=0)
  t0 = time.perf_counter()
  compiled = step.lower(abstract_state, (images,)).compile()
  compile_s = time.perf_counter() - t0

  per_chip = args.batch / len(devices)
  mem = compiled.memory_analysis()
  cost = aot.cost_analysis(compiled)
  flop = cost.get("flops", 0.0) / per_chip
  moved = cost.get("bytes accessed", 0.0) / per_chip
  print(json.dumps({
      "peer": "KAIST-AILab/MaskedAutoencoder-Jax", "config": "MAE ViT-B/16 (8 x 512 decoder)",
      "topology": s.name, "devices": len(devices), "batch": args.batch,
      "per_chip_batch": per_chip, "dtype": "float32",
      "argument_gb": round(mem.argument_size_in_bytes / 1e9, 3),
      "temp_gb": round(mem.temp_size_in_bytes / 1e9, 3),
      "compiled_gflop_per_image": round(flop / 1e9, 2),
      "gb_accessed_per_image": round(moved / 1e9, 4),
      "flop_per_byte": round(flop / moved, 1) if moved else None,
      "collectives": aot.collectives(compiled.as_text()),
      "compile_s": round(compile_s, 1), **aot.versions()}), flush=True)


if __name__ == "__main__":
  main()
