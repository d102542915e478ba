"""Matplotlib figures for `ddae_jax.analyze`, one function per figure.

matplotlib is imported inside `_pyplot`, with the Agg backend (no display),
so the rest of the package never needs it (`pip install -e '.[analysis]'`).
Every function takes NumPy data computed elsewhere and writes one PNG.
"""

from __future__ import annotations

import numpy as np

DPI = 90


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _save(fig, path) -> None:
  fig.savefig(str(path), dpi=DPI, bbox_inches="tight")
  _pyplot().close(fig)


def _blank(ax) -> None:
  ax.set_xticks([])
  ax.set_yticks([])


def reconstructions(data: dict, blocks, path) -> None:
  """One row per image: original, masked input, distance map, K loss weights, K reconstructions.

  Args:
    data: from `analysis.reconstruction.reconstruct` (image [B, H, W, 3], masked,
      distance [B, r, c], weights [B, K, r, c], reconstruction [B, K, H, W, 3]).
    blocks: the K supervised block numbers (column titles).
  """
  plt = _pyplot()
  b, k = data["weights"].shape[:2]
  cols = 3 + 2 * k
  fig, axes = plt.subplots(b, cols, figsize=(1.3 * cols, 1.4 * b), squeeze=False)
  dmax = max(float(data["distance"].max()), 1e-12)
  for i in range(b):
    panels = [(data["image"][i], "original", {}), (data["masked"][i], "masked", {}),
              (data["distance"][i], "distance", dict(cmap="gray_r", vmin=0, vmax=dmax))]
    panels += [(data["weights"][i, j], f"weight b{g}", dict(cmap="viridis", vmin=0, vmax=1))
               for j, g in enumerate(blocks)]
    panels += [(data["reconstruction"][i, j], f"recon b{g}", {}) for j, g in enumerate(blocks)]
    for ax, (img, title, kw) in zip(axes[i], panels, strict=True):
      ax.imshow(img, interpolation="nearest", **kw)
      _blank(ax)
      if i == 0:
        ax.set_title(title, fontsize=8)
  _save(fig, path)


def distance_maps(panels: list[dict], path) -> None:
  """Fig. 2: one row per masking kind, one column per ratio; darker = farther from visible.

  Args:
    panels: from `analysis.distance.distance_map_panels`.
  """
  plt = _pyplot()
  kinds = list(dict.fromkeys(p["kind"] for p in panels))
  ratios = list(dict.fromkeys(p["ratio"] for p in panels))
  fig, axes = plt.subplots(len(kinds), len(ratios), figsize=(2.2 * len(ratios),
                                                              2.4 * len(kinds)), squeeze=False)
  for p in panels:
    ax = axes[kinds.index(p["kind"])][ratios.index(p["ratio"])]
    ax.imshow(p["normalized"], cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(f"{p['kind']} {p['ratio']:.0%}", fontsize=9)
    _blank(ax)
  _save(fig, path)


def beta_curves(runs: dict[str, dict], path, x: str = "step", zoom_from: float = 0.1) -> None:
  """Fig. 5/6: beta of every block over training; colour = block, line style = run.

  Two panels: the whole run (Fig. 5a), and from `zoom_from` of the run on
  with its own y-range (Fig. 5b, the slow rise after the initial drop).

  Args:
    runs: {run label: `analysis.beta.beta_curves(...)`}.
    x: "step" or "epoch".
  """
  plt = _pyplot()
  styles = ["-", "--", ":", "-."]
  blocks = sorted({c["block"] for curves in runs.values() for c in curves.values()})
  colours = {g: plt.cm.viridis(i / max(len(blocks) - 1, 1)) for i, g in enumerate(blocks)}
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for r, (label, curves) in enumerate(runs.items()):
    for c in curves.values():
      xs = np.asarray(c[x], np.float64)
      ys = np.asarray(c["value"], np.float64)
      branch = "" if c["branch"] == "shared" else f" {c['branch']}"
      kw = dict(color=colours[c["block"]], linestyle=styles[r % len(styles)],
                label=f"{label}: block {c['block']}{branch}")
      axes[0].plot(xs, ys, **kw)
      keep = xs >= xs.min() + zoom_from * (xs.max() - xs.min())
      axes[1].plot(xs[keep], ys[keep], **kw)
  for ax, title in zip(axes, ["beta over training", f"from {zoom_from:.0%} of training on"],
                       strict=True):
    ax.set_xlabel(x)
    ax.set_ylabel("beta")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
  fig.subplots_adjust(wspace=0.25)
  _save(fig, path)


def metric_over_training(groups: dict[str, dict], path, metric: str, x: str = "epoch") -> None:
  """An evaluator's metric over training: each group's mean over its runs, the min-max band
  shaded, every run thin.

  Args:
    groups: {label: `analysis.evals.group_summary(...)`}.
  """
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5.6, 3.6))
  for i, (label, g) in enumerate(groups.items()):
    colour = plt.cm.tab10(i)
    xs = np.asarray(g[x] if None not in g[x] else g["step"], np.float64)
    runs = np.asarray(g["runs"])
    for run in runs:
      ax.plot(xs, run, color=colour, linewidth=0.6, alpha=0.5)
    ax.fill_between(xs, g["min"], g["max"], color=colour, alpha=0.15)
    ax.plot(xs, g["mean"], color=colour, linewidth=2, marker="o", markersize=3,
            label=f"{label} (mean of {len(runs)})")
  ax.set_xlabel(x)
  ax.set_ylabel(metric)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  _save(fig, path)


def attention_maps(images: np.ndarray, maps: dict[str, np.ndarray], patch_size: int,
                   block: int, path) -> None:
  """Fig. 3/7: the input images on top, one row of class-token attention per checkpoint.

  Args:
    images: float32[B, H, W, 3] in [0, 1].
    maps: {checkpoint label: float32[B, rows, cols]} (head-averaged class-token attention).
    block: the 1-based block the maps come from (title only).
  """
  from ddae_jax.analysis.attention import upsample_map
  plt = _pyplot()
  b = images.shape[0]
  fig, axes = plt.subplots(1 + len(maps), b, figsize=(1.5 * b, 1.6 * (1 + len(maps))),
                           squeeze=False)
  for j in range(b):
    axes[0][j].imshow(images[j])
    _blank(axes[0][j])
  axes[0][0].set_ylabel("input", fontsize=8)
  for r, (label, m) in enumerate(maps.items(), start=1):
    for j in range(b):
      heat = upsample_map(m[j], patch_size)
      # Each image on its own scale: the figure is about where the class
      # token looks, not how peaked the head average is.
      heat = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-12)
      axes[r][j].imshow(images[j])
      axes[r][j].imshow(heat, cmap="jet", alpha=0.55, vmin=0, vmax=1,
                        extent=(-0.5, images.shape[2] - 0.5, images.shape[1] - 0.5, -0.5))
      _blank(axes[r][j])
    axes[r][0].set_ylabel(label, fontsize=8)
  fig.suptitle(f"class-token attention, block {block}, mean over heads", fontsize=9)
  _save(fig, path)


def attention_distance(distances: dict[str, np.ndarray], path,
                       uniform: dict[str, float] | None = None) -> None:
  """Fig. 4: mean attention distance of every head (dots) against the block number.

  Args:
    distances: {checkpoint label: float32[depth, heads] in pixels}; one panel each,
      sharing the y-axis so the runs compare directly.
    uniform: {checkpoint label: the distance of uniform attention}, drawn dashed
      as the reference between local (below) and global (above) heads.
  """
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(distances), figsize=(4.2 * len(distances), 3.4),
                           sharey=True, squeeze=False)
  for ax, (label, d) in zip(axes[0], distances.items(), strict=True):
    depth, heads = d.shape
    for h in range(heads):
      ax.scatter(np.arange(1, depth + 1), d[:, h], s=12, label=f"head {h}")
    if uniform and label in uniform:
      ax.axhline(uniform[label], color="gray", linestyle="--", linewidth=1,
                 label="uniform attention")
    ax.set_title(label, fontsize=10)
    ax.set_xlabel("block")
    ax.set_xticks(np.arange(1, depth + 1))
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("mean attention distance (pixels)")
  _save(fig, path)
