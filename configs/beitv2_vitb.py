r"""BEiT-v2 ViT-B/16 and DDS-BEiT-v2, 100 epochs: Table 2's two-stage rows.

  python -m ddae_jax.main --config=configs/beitv2_vitb.py --workdir=gs://BUCKET/beitv2_vitb \
      --config.tokenizer.checkpoint=/path/to/vqkd_encoder_base_decoder_3x768x12_clip-d93179da.pth
  python -m ddae_jax.main --config=configs/beitv2_vitb.py:dds_beitv2 --workdir=... (same flag)

The targets come from BEiT-v2's public VQ-KD tokenizer (microsoft/unilm,
beit2/TOKENIZER.md); download the file and pass its path (the default is that
file name in the working directory). The run stops before any compute if the
file is missing or its tensors do not match. Variants: :dds_beitv2 (shared
head on blocks 3, 6, 9, 12 with dynamic weights), :ep800, :smoke, :fsdp.

The student and recipe are BEiT-v2's (ablations.beitv2_defaults; README,
"Reproducing the paper's tables", gives each value's source): shared relative
position bias, layer scale 0.1, the class-token head on block 9, AdamW
(0.9, 0.98) at 1.5e-3 for batch 2048, clipping at 3, colour jitter 0.4.
Export a pretrained student with `convert export --layout=beit`.
"""

from ddae_jax import ablations, config_lib

VARIANTS = (*config_lib.VARIANTS, "beitv2", "dds_beitv2")


def get_config(arg: str = ""):
  config = config_lib.base_config()
  config.model.size = "base"
  ablations.beitv2_defaults(config)
  return config_lib.apply_variants(config, arg)
