r"""Linear probing of a frozen pretrained encoder (MAE's protocol, Appendix A).

  python -m ddae_jax.linear_probe --config=configs/linear_probe_vitb.py \
      --config.init_dir=gs://BUCKET/ddae_vitb_ep100 --workdir=gs://BUCKET/lin_vitb
  python -m ddae_jax.linear_probe --config=configs/linear_probe_quickstart.py \
      --config.init_dir=/tmp/ddae_quickstart --workdir=/tmp/ddae_quickstart_lin

The encoder stays frozen (it is not part of the train state and gets no
gradient); BatchNorm without affine parameters and a linear head train with
LARS (momentum 0.9, base lr 0.1 * batch / 256, no weight decay). Rerunning the
command resumes; the encoder is read again from config.init_dir.
The library: ddae_jax/evaluation/linear_probe.py.
"""

from ddae_jax import cli
from ddae_jax.evaluation import linear_probe

if __name__ == "__main__":
  cli.run_evaluation(linear_probe.train_and_evaluate, "Linear-probe config file.")
