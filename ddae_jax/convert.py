r"""Encoders to and from the PyTorch ecosystem: timm and MAE checkpoints.

  python -m ddae_jax.convert export --workdir=RUN --out=vit.safetensors [--ema]
      [--layout=timm|mae_vit|mae_pretrain|beit] [--num_classes=C] [--image_size=S]
  python -m ddae_jax.convert import --from=mae_pretrain_vit_base.pth --out=DIR \
      [--image_size=384] [--size=base]

`export` writes the encoder as a timm `vit_{size}_patch{P}_{S}` state dict
(`.safetensors`, or `.pth`/`.pt` through torch), or a BEiT-v2 student as timm's
`beit_{size}_patch{P}_{S}` (`--layout=beit`); `import` writes an Orbax
checkpoint plus config.json in the pretraining layout, which the fine-tuning,
linear-probe, k-NN and analysis binaries restore (`pretrained.load_encoder`).
Key layouts are listed in `ddae_jax/weights/torch_vit.py`; files are read and
written by `ddae_jax/weights/state_dict.py` (torch only for `.pth` files, and
tensors only: weights_only=True).
The library: ddae_jax/weights/convert.py.
"""

import sys

from ddae_jax.weights import convert

if __name__ == "__main__":
  convert.main(sys.argv[1:])
