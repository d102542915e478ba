r"""Weighted k-NN classification on frozen features (DINO's protocol): a quick proxy.

  python -m ddae_jax.knn --config=configs/knn_vitb.py \
      --config.init_dir=gs://BUCKET/ddae_vitb_ep100 --workdir=gs://BUCKET/knn_vitb
  python -m ddae_jax.knn --config=configs/knn_quickstart.py \
      --config.init_dir=/tmp/ddae_quickstart --workdir=/tmp/ddae_quickstart_knn

Features of centre crops are L2-normalised; each validation image takes its
k = 20 most cosine-similar training images, each voting for its label with
weight exp(similarity / 0.07); top-1/top-5 rank the summed votes and the
loss is -log of the label's share of the votes. Nothing trains, so there is
no checkpoint: the metrics go to the workdir (CLU, metrics.jsonl, results.json).
The library: ddae_jax/evaluation/knn.py.
"""

from ddae_jax import cli
from ddae_jax.evaluation import knn

if __name__ == "__main__":
  cli.run_evaluation(knn.run, "k-NN config file.")
