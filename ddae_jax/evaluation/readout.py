"""Which features a frozen-encoder protocol reads: a block and a pooling, per lineage.

k-NN and linear probing (the binaries and the evaluators inside pretraining)
read one block's output of the frozen encoder, pooled one of two ways:

  "avg"  the mean of the block's raw patch tokens (global pooling)
  "cls"  the class token after the encoder's final norm

A block b < depth is read as if the encoder ended there (BootMAE's
`main_linprobe.py --depth b`): the blocks after it are not run, and "cls"
applies the final norm to block b's output.

"auto" (pooling) and 0 (block) follow the protocol of the pretraining's own
lineage, read off its config:

  DDAE and the BootMAE rows  global pooling of block 10 of ViT-B, 18 of ViT-L
      (LightDXY/BootMAE scripts/linear/bash_linear_BootMAE_{Base,Large}_800.sh:
      --depth 10 / 18 --global_pool). The choice is keyed by depth: ViT-S, 12
      blocks like ViT-B and without a script of its own, reads block 10 too;
      other depths (the tiny quickstart's 4) read their last block.
  MAE rows (no momentum encoder: distill.enabled False)  the class token of the
      last block (facebookresearch/mae main_linprobe.py's default, no --global_pool).
  BEiT-v2  the class token of the last block (its class-token head trains it).
"""

from __future__ import annotations

LINEAGES = ("bootmae", "mae", "beitv2")
# BootMAE's linear-probe depth per encoder depth (ViT-B 12 blocks, ViT-L 24).
BOOTMAE_BLOCKS = {12: 10, 24: 18}


def lineage(pretrain_config) -> str:
  """The protocol family of a pretraining config (None, e.g. a random encoder: "bootmae")."""
  if pretrain_config is None:
    return "bootmae"
  if pretrain_config.get("method", "ddae") == "beitv2":
    return "beitv2"
  if not pretrain_config.get("distill", {}).get("enabled", True):
    return "mae"
  return "bootmae"


def resolve(block: int, pooling: str, depth: int, pretrain_config=None) -> tuple[int, str]:
  """(1-based block, "avg" | "cls"): `block` 0 and `pooling` "auto" by the lineage.

  Args:
    block: 0 (the lineage's) or a block in [1, depth].
    pooling: one of config_evals.POOLINGS.
    depth: the encoder's blocks.
    pretrain_config: the pretraining config whose lineage decides, or None.
  """
  family = lineage(pretrain_config)
  if pooling == "auto":
    pooling = "avg" if family == "bootmae" else "cls"
  if block == 0:
    block = BOOTMAE_BLOCKS.get(depth, depth) if family == "bootmae" else depth
  if not 1 <= block <= depth:
    raise ValueError(f"block {block} is outside the encoder's blocks [1, {depth}]")
  return block, pooling


def describe(block: int, pooling: str, depth: int) -> str:
  what = {"avg": "mean of the patch tokens", "cls": "class token"}[pooling]
  return f"{what} of block {block} of {depth}"
