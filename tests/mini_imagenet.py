"""A miniature ImageNet manual download in the official layout, from real photographs.

`write_manual_dir(dir)` writes what image-net.org hands out, scaled down:

  ILSVRC2012_img_train.tar   one <synset>.tar per class of <synset>_<n>.JPEG
  ILSVRC2012_img_val.tar     ILSVRC2012_val_00000001.JPEG ... (flat)

so TFDS's own `imagenet2012` builder prepares it offline
(`download_and_prepare` with a `manual_dir`), exactly as it prepares the real
150 GB one. The pictures are scikit-learn's two bundled photographs (a temple
and a flower); a class is one photograph under one colour cast, and its images
are random crops of it, so classes differ the way a colour histogram sees.

Validation labels: the builder does not read a label by the file's index. It
sorts the names in the val tar and pairs the k-th name with the k-th line of
its bundled validation_labels.txt. A miniature val tar of files 1..V therefore
gets the real labels of the first V official validation images, and the
classes are taken from those lines so that every validation image has a class
the train split also holds (the first 20 lines name 20 distinct synsets).
"""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np

SIZE = 256  # pixels per side: big enough for 224 crops, small enough to prepare in seconds
# Per-channel gains of the colour casts; class c uses cast c // 2 on photograph c % 2.
CASTS = ((1.0, 1.0, 1.0), (1.3, 0.8, 0.8), (0.8, 1.3, 0.8), (0.8, 0.8, 1.3), (1.3, 1.3, 0.7),
         (0.7, 1.3, 1.3), (1.3, 0.7, 1.3), (0.6, 0.6, 0.6), (1.4, 1.1, 0.7), (0.7, 0.9, 1.4))


def _tfds_file(name: str) -> str:
  import tensorflow_datasets as tfds
  return os.fspath(tfds.core.tfds_path(f"datasets/imagenet2012/{name}"))


def validation_synsets(num_val: int) -> list[str]:
  """The labels TFDS gives val files 1..num_val: the first lines of its bundled list."""
  with open(_tfds_file("validation_labels.txt")) as f:
    return f.read().split()[:num_val]


def class_names() -> list[str]:
  """imagenet2012's 1000 synsets in label order (label i is line i)."""
  with open(_tfds_file("labels.txt")) as f:
    return f.read().split()


def _photographs() -> list[np.ndarray]:
  from sklearn.datasets import load_sample_images
  return [np.asarray(im) for im in load_sample_images().images]  # uint8 [427, 640, 3] each


def _jpeg(photo: np.ndarray, cast, rng: np.random.Generator) -> bytes:
  """A random square crop (40-100% of the short side) of `photo`, cast, as a SIZE px JPEG."""
  from PIL import Image
  h, w, _ = photo.shape
  side = int(min(h, w) * rng.uniform(0.4, 1.0))
  top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
  crop = photo[top:top + side, left:left + side].astype(np.float32) * np.asarray(cast)
  image = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).resize((SIZE, SIZE))
  out = io.BytesIO()
  image.save(out, format="JPEG", quality=85)
  return out.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_manual_dir(manual_dir: str, num_val: int = 20, train_per_class: int = 12,
                     seed: int = 0) -> dict:
  """Writes ILSVRC2012_img_{train,val}.tar into manual_dir (no test tar: TFDS skips it).

  Returns:
    {"synsets": the classes (sorted), "val_synsets": val file k's label (k = 1..),
     "num_train": train images, "num_val": validation images}.
  """
  os.makedirs(manual_dir, exist_ok=True)
  rng = np.random.default_rng(seed)
  photos = _photographs()
  val_synsets = validation_synsets(num_val)
  synsets = sorted(set(val_synsets))
  if len(synsets) > 2 * len(CASTS):
    raise ValueError(f"{len(synsets)} classes, but only {2 * len(CASTS)} recipes")
  recipe = {s: (photos[c % 2], CASTS[c // 2]) for c, s in enumerate(synsets)}

  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as train:
    for synset in synsets:
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as per_class:
        for n in range(1, train_per_class + 1):
          _add(per_class, f"{synset}_{n}.JPEG", _jpeg(*recipe[synset], rng))
      _add(train, f"{synset}.tar", inner.getvalue())
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as val:
    for k, synset in enumerate(val_synsets, 1):
      _add(val, f"ILSVRC2012_val_{k:08d}.JPEG", _jpeg(*recipe[synset], rng))
  return {"synsets": synsets, "val_synsets": val_synsets,
          "num_train": len(synsets) * train_per_class, "num_val": num_val}


def prepare(data_dir: str, **kwargs) -> dict:
  """Writes the manual download under data_dir/downloads/manual and lets TFDS prepare it.

  The manual dir is where the trainer's error message tells users to put the
  real tars, so this is the path a user follows, offline.
  """
  import tensorflow_datasets as tfds
  manual_dir = os.path.join(data_dir, "downloads", "manual")
  made = write_manual_dir(manual_dir, **kwargs)
  builder = tfds.builder("imagenet2012", data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir))
  return dict(made, builder=builder)
