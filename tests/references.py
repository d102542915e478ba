"""Reference implementations that several test files check the library against."""

import numpy as np


def mae_loss_numpy(imgs_nchw, pred, mask, p):
  """MAE's forward_loss with norm_pix_loss=True, transcribed to NumPy."""
  n, c, h, w = imgs_nchw.shape
  x = imgs_nchw.reshape(n, c, h // p, p, w // p, p)
  target = np.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)
  mean = target.mean(-1, keepdims=True)
  var = target.var(-1, ddof=1, keepdims=True)  # torch's var is unbiased
  target = (target - mean) / (var + 1e-6) ** 0.5
  loss = ((pred - target) ** 2).mean(-1)
  return (loss * mask).sum() / mask.sum()
