r"""Quickstart: DDAE on a tiny ViT, on scikit-learn's handwritten digits (no download).

  python -m ddae_jax.main --config=configs/quickstart.py --workdir=/tmp/ddae_quickstart

1,497 real labelled 8x8 digits upsampled to 32 px, a 64-wide 4-block ViT with
patch 4 and K = 4 supervised blocks, both branches, learnable beta: the
paper's method at toy size, a few minutes on a laptop CPU. Three times (epochs
3.3, 6.7 and 10) it reports k-NN top-1 on the 300 held-out digits (`knn/top1` in
metrics.jsonl).
"""

from ddae_jax import config_lib


def get_config(arg: str = ""):
  config = config_lib.tiny_config()
  config.data.source = "digits"
  config.data.crop_scale = (0.5, 1.0)  # digits fill the frame; keep most of it
  config.data.flip = False            # a mirrored digit is another symbol
  config.batch_size = 64
  config.epochs = 10.0
  config.optim.base_lr = 1.5e-3 * 256 / 64
  config.optim.warmup_epochs = 1.0
  config.ema.ramp_epochs = 5.0
  config.log_every_steps = 25
  config.checkpoint_every_steps = 100
  # k-NN top-1 on the 300 held-out digits at epochs 3.3, 6.7 and 10, all 1,497 training
  # digits as the bank, as the knn binary (metrics knn/top1 ...): about 2 s each on 2 CPU
  # cores, under 5% of the run with the first one's compile (README "Watching a run").
  config.evals.knn.update(every_epochs=10.0 / 3, bank_size=0, query_split="test",
                          num_queries=0, batch_size=256)
  return config_lib.apply_variants(config, arg)
