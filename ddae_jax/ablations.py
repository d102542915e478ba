"""The paper's comparison rows (Table 2) and ablations (Tables 3, 4, 6, 7) as config variants.

A variant is a function that edits a config; it rides on the config argument,
combined with commas: `--config=configs/mae_vits.py:dds_mae`. `TABLES` lists,
per table, the exact config argument of every row; `python -m ddae_jax.sweep`
turns a table into one training command per row.

Method variants:
  mae          MAE (He et al.): random masking 75%, 8 x 512 pixel decoder,
               normalised-pixel loss on the last block, uniform weights, no
               distillation and so no momentum encoder.
  d_mae        MAE + dynamic loss (eq. 2) on the last block          (Table 3)
  ds_mae       MAE + deep supervision, K = 4, uniform weights         (Table 3)
  dds_mae      MAE + deep dynamic supervision: the K blocks through MAE's own
               decoder, pixel targets, dynamic weights (section 4.3)  (Tables 2, 3)
  beitv2       BEiT-v2 as its code trains: its student (shared relative position
               bias, layer scale, class-token head), mask tokens, blockwise
               masking of 75 / 196 patches, cross-entropy on the frozen VQ-KD
               tokenizer's codes, its optimizer and augmentation (Table 2)
  dds_beitv2   BEiT-v2 + the shared norm and LM head on K = 4 blocks with
               dynamic weights; the class-token head as in BEiT-v2 (Table 2)
  ep300        300 epochs, 40 warm-up (MAE's schedule, Table 2's MAE row)
Ablations of deep dynamic supervision (Table 6: K; Table 7: beta), each with
deep supervision and dynamic loss on:
  k1, k2, k4, k6                  K supervised blocks, g_i = (B / K) i
  beta_fixed_0, beta_fixed_m05    beta frozen at 0 or -0.5
  beta_learn_0, beta_learn_m05    learnable, initialised at 0 or -0.5 (the default)
  beta_learn_m01_m07              learnable from [-0.1, -0.3, -0.5, -0.7]
  beta_learn_m07_m01              learnable from [-0.7, -0.5, -0.3, -0.1]
Which DDAE branch gets deep dynamic supervision (Table 4, both branches train):
  dds_none, dds_pixel, dds_distill, dds_both
"""

from __future__ import annotations

import functools


def _mae(c):
  """MAE's recipe; the pixel decoder is MAE's 8 blocks of width 512, 16 heads."""
  c.method = "ddae"
  c.masking.kind, c.masking.ratio = "random", 0.75
  c.pixel.enabled, c.pixel.norm_pix, c.pixel.dds = True, True, True
  c.pixel.norm_pix_stats = "per_patch"  # MAE's norm_pix_loss
  c.optim.min_lr = 0.0                  # MAE's cosine decays to 0
  c.optim.no_decay_names = ()           # timm's add_weight_decay, no skip list
  c.pixel.decoder_width, c.pixel.decoder_depth, c.pixel.decoder_heads = 512, 8, 16
  c.distill.enabled = False
  c.dds.deep_supervision, c.dds.dynamic = False, False


def _mae_row(c, deep_supervision, dynamic):
  _mae(c)
  c.dds.deep_supervision, c.dds.dynamic = deep_supervision, dynamic


def _ep300(c):
  c.epochs, c.optim.warmup_epochs = 300.0, 40.0
  if c.ema.schedule == "linear":
    c.ema.ramp_epochs = 150.0  # BootMAE's schedule is already written in epochs


def beitv2_defaults(c):
  """BEiT-v2's base recipe (microsoft/unilm beit2: PRETRAINING.md, run_beitv2_pretraining.py,
  modeling_pretrain.py, datasets.py), 100 epochs as in Table 2 (README: each value's source).

  Student: no absolute positions, one relative position bias shared by all
  blocks, layer scale 0.1, the class-token head (block 9's patches with the last
  class token, 2 head blocks, shared norm and LM head). Recipe: 75 of 196
  patches masked by BEiT's blockwise generator (min. 16 per block), batch 2048
  at lr 1.5e-3 (1.875e-4 per 256) with 10 warm-up epochs and cosine decay to
  1e-5, AdamW betas (0.9, 0.98) (its short-schedule value) and eps 1e-8,
  weight decay 0.05, gradient clipping at 3, colour jitter 0.4 and crops of
  scale (0.2, 1), ImageNet mean and std; one supervised block (the last).
  """
  c.method = "beitv2"
  c.model.pos_embed, c.model.rel_pos_bias, c.model.layer_scale = "none", True, 0.1
  c.cls_pt.early_block, c.cls_pt.head_depth = 9, 2
  # BEiT's generator alone: 75 patches, rectangles of 16 up to all still missing.
  c.masking.kind, c.masking.ratio, c.masking.min_patches = "blockwise", 75 / 196, 16
  c.masking.block_ratio, c.masking.max_patches = 0.0, 0
  c.pixel.enabled = c.distill.enabled = False
  c.dds.deep_supervision, c.dds.dynamic = False, False
  c.model.feature_norm = "final"  # one norm and one head shared by every block
  c.batch_size, c.epochs = 2048, 100.0
  c.optim.base_lr, c.optim.b1, c.optim.b2, c.optim.eps = 1.5e-3 * 256 / 2048, 0.9, 0.98, 1e-8
  c.optim.warmup_epochs, c.optim.min_lr = 10.0, 1e-5
  c.optim.weight_decay, c.optim.grad_clip_norm = 0.05, 3.0
  c.data.crop_scale, c.data.flip, c.data.color_jitter = (0.2, 1.0), True, 0.4
  c.tokenizer.size, c.tokenizer.patch_size = "base", 16
  c.tokenizer.code_dim, c.tokenizer.vocab_size = 32, 8192
  if not c.tokenizer.checkpoint:
    c.tokenizer.checkpoint = "vqkd_encoder_base_decoder_3x768x12_clip-d93179da.pth"


def _dds_beitv2(c):
  if c.method != "beitv2":
    beitv2_defaults(c)
  c.dds.deep_supervision, c.dds.dynamic = True, True


def _dds(c):
  """Deep dynamic supervision on, K and lambda from the paper's defaults."""
  c.dds.deep_supervision, c.dds.dynamic = True, True
  c.dds.blocks, c.dds.block_weights = (), ()


def _k(c, k):
  _dds(c)
  c.dds.num_supervised = k


def _beta(c, init, learnable):
  _dds(c)
  c.dds.beta_init, c.dds.beta_learnable = tuple(init), learnable


def _branches(c, pixel, distill):
  c.method = "ddae"
  c.pixel.enabled = c.distill.enabled = True
  c.pixel.dds, c.distill.dds = pixel, distill
  c.dds.deep_supervision, c.dds.dynamic = True, True


_p = functools.partial
VARIANTS = {
    "mae": _mae,
    "d_mae": _p(_mae_row, deep_supervision=False, dynamic=True),
    "ds_mae": _p(_mae_row, deep_supervision=True, dynamic=False),
    "dds_mae": _p(_mae_row, deep_supervision=True, dynamic=True),
    "ep300": _ep300,
    "beitv2": beitv2_defaults,
    "dds_beitv2": _dds_beitv2,
    "k1": _p(_k, k=1), "k2": _p(_k, k=2), "k4": _p(_k, k=4), "k6": _p(_k, k=6),
    "beta_fixed_0": _p(_beta, init=(0.0,), learnable=False),
    "beta_fixed_m05": _p(_beta, init=(-0.5,), learnable=False),
    "beta_learn_0": _p(_beta, init=(0.0,), learnable=True),
    "beta_learn_m01_m07": _p(_beta, init=(-0.1, -0.3, -0.5, -0.7), learnable=True),
    "beta_learn_m07_m01": _p(_beta, init=(-0.7, -0.5, -0.3, -0.1), learnable=True),
    "beta_learn_m05": _p(_beta, init=(-0.5,), learnable=True),
    "dds_none": _p(_branches, pixel=False, distill=False),
    "dds_pixel": _p(_branches, pixel=True, distill=False),
    "dds_distill": _p(_branches, pixel=False, distill=True),
    "dds_both": _p(_branches, pixel=True, distill=True),
}

# (row as the paper names it, config argument, the paper's fine-tuning top-1 %).
TABLES = {
    "table2": (
        ("MAE, 300 ep", "configs/mae_vitb.py:mae,ep300", 82.9),
        ("DDS-MAE, 100 ep", "configs/mae_vitb.py:dds_mae", 83.2),
        ("BEiT-v2, 100 ep", "configs/beitv2_vitb.py", 83.9),
        ("DDS-BEiT-v2, 100 ep", "configs/beitv2_vitb.py:dds_beitv2", 84.1)),
    "table3": (
        ("MAE", "configs/mae_vits.py:mae", 78.7),
        ("D-MAE", "configs/mae_vits.py:d_mae", 78.9),
        ("DS-MAE", "configs/mae_vits.py:ds_mae", 79.7),
        ("DDS-MAE", "configs/mae_vits.py:dds_mae", 79.9)),
    "table4": (
        ("no DDS", "configs/vitb.py:dds_none", 83.0),
        ("DDS on feature self-distillation", "configs/vitb.py:dds_distill", 83.2),
        ("DDS on pixel regression", "configs/vitb.py:dds_pixel", 83.3),
        ("DDAE (DDS on both)", "configs/vitb.py:dds_both", 83.5)),
    "table6": tuple((f"K = {k}, blocks {blocks}", f"configs/mae_vits.py:dds_mae,k{k}", top1)
                    for k, blocks, top1 in ((1, "[12]", 78.9), (2, "[6, 12]", 79.5),
                                            (4, "[3, 6, 9, 12]", 79.9),
                                            (6, "[2, 4, ..., 12]", 79.9))),
    "table7": (
        ("fixed, [0, 0, 0, 0]", "configs/mae_vits.py:dds_mae,beta_fixed_0", 79.7),
        ("fixed, [-0.5] x 4", "configs/mae_vits.py:dds_mae,beta_fixed_m05", 79.5),
        ("learnable, [0, 0, 0, 0]", "configs/mae_vits.py:dds_mae,beta_learn_0", 79.6),
        ("learnable, [-0.1, -0.3, -0.5, -0.7]",
         "configs/mae_vits.py:dds_mae,beta_learn_m01_m07", 79.5),
        ("learnable, [-0.7, -0.5, -0.3, -0.1]",
         "configs/mae_vits.py:dds_mae,beta_learn_m07_m01", 79.7),
        ("learnable, [-0.5] x 4", "configs/mae_vits.py:dds_mae,beta_learn_m05", 79.9)),
}
