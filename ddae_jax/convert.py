r"""Encoders to and from the PyTorch ecosystem: timm and MAE checkpoints.

  python -m ddae_jax.convert export --workdir=RUN --out=vit.safetensors [--ema]
      [--layout=timm|mae_vit|mae_pretrain|beit] [--num_classes=C] [--image_size=S]
  python -m ddae_jax.convert import --from=mae_pretrain_vit_base.pth --out=DIR \
      [--image_size=384] [--size=base]

The library: ddae_jax/weights/convert.py.
"""

import sys

from ddae_jax.weights import convert

if __name__ == "__main__":
  convert.main(sys.argv[1:])
