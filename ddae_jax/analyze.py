r"""The paper's figures from your own runs: PNGs plus the numbers behind them (JSON).

  python -m ddae_jax.analyze reconstruct --workdir=/tmp/ddae_quickstart --split=test
  python -m ddae_jax.analyze distance-maps --grid=14 --ratios=0.5,0.75,0.9
  python -m ddae_jax.analyze beta --workdir=/tmp/ddae_quickstart
  python -m ddae_jax.analyze attention-maps --workdir=/tmp/mae --workdir=/tmp/ddae --block=3
  python -m ddae_jax.analyze attention-distance --workdir=/tmp/mae --workdir=/tmp/ddae

Every command writes <out>/<command>.png and <out>/<command>.json (default
--out: the current directory). `python -m ddae_jax.analyze <command> --help`
describes each. A workdir is a pretraining run's directory (or one written by
`convert import` / `pretrained.save_encoder`); runs without a config.json need
--config. Everything runs on the CPU when no accelerator is present.
The library: ddae_jax/analysis/commands.py.
"""

import sys

from ddae_jax.analysis import commands

if __name__ == "__main__":
  commands.main(sys.argv[1:])
