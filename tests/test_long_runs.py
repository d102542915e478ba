"""Long runs at scale (issue 14): bounded resume cost, one state on restore, the
dataset's size as an argument."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny

from ddae_jax import config_lib, train
from ddae_jax.methods import schedules
from ddae_jax.weights import checkpoints, pretrained


def test_the_dataset_size_is_passed_to_the_step_arithmetic_not_written_into_the_config():
  from ddae_jax import optim
  config = tiny(epochs=10.0)  # config.num_train_images = 256, the fallback
  assert config_lib.total_steps(config, 1497) == round(10 * 1497 / 16)
  assert config_lib.total_steps(config) == 160 and config.num_train_images == 256
  # one warm-up epoch: 94 steps of 16 of 1497
  schedule = optim.lr_schedule(config, config_lib.steps(config, 1497))
  assert float(schedule(94)) == pytest.approx(config_lib.learning_rate(config))
  own_size = optim.lr_schedule(config, config_lib.steps(config))
  assert float(own_size(94)) < config_lib.learning_rate(config)
  # the 5-epoch ramp's end
  momentum = schedules.ema_momentum(config, 5 * 94, config_lib.steps(config, 1497))
  assert float(momentum) == pytest.approx(config.ema.momentum_end)


# ------------------------------------------------------------- issue 14.2
@pytest.mark.slow  # compiles and restores a state on 8 devices
def test_resume_restores_into_the_abstract_state_without_a_fresh_one(tmp_path, monkeypatch):
  from ddae_jax import train_step as ts
  workdir = str(tmp_path / "run")
  config = tiny(epochs=2.0)  # 32 steps: the checkpoint below is the end, so no step runs
  built = ts.build(config)
  state = dict(built.state, step=jnp.asarray(32, jnp.int32))
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(built.state))
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), 1, 3, use_async=False)
  ckpt.save(32, state, data_position=512, force=True)
  ckpt.close()
  pretrained.save_config(workdir, config)
  del built, state

  traced, live_after_restore = [], []
  init_state = ts.init_state
  monkeypatch.setattr(ts, "init_state", lambda *a: traced.append(1) or init_state(*a))
  restore = checkpoints.Checkpointer.restore

  def restore_and_measure(self, step, abstract_state):
    out = restore(self, step, abstract_state)
    live_after_restore.append(sum(a.nbytes for a in jax.live_arrays()))
    return out
  monkeypatch.setattr(checkpoints.Checkpointer, "restore", restore_and_measure)
  baseline = sum(a.nbytes for a in jax.live_arrays())
  train.train_and_evaluate(tiny(epochs=2.0), workdir)
  assert len(traced) == 1  # traced once for shapes (eval_shape); never jitted and run
  assert live_after_restore[0] - baseline <= 1.1 * state_bytes, (live_after_restore, baseline,
                                                                  state_bytes)


# ------------------------------------------------------------- issue 14.1
def _prepared_tfds(data_dir, n=100):
  """A small TFDS dataset prepared on disk (tfrecords, like imagenet2012): image i has label i."""
  import tensorflow_datasets as tfds

  class ResumeCount(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(8, 8, 3)),
          "label": tfds.features.ClassLabel(num_classes=n)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(n):
        yield i, {"image": np.full((8, 8, 3), i, np.uint8), "label": i}

  builder = ResumeCount(data_dir=data_dir)
  builder.download_and_prepare()
  return builder


def test_tfds_resume_reads_at_most_one_epoch_however_far_the_run_got(tmp_path):
  import tensorflow as tf

  from ddae_jax.data import sources
  builder = _prepared_tfds(str(tmp_path / "tfds"))

  def counted_source():
    """A source whose records are counted as the pipeline reads them, skipped or used."""
    source = sources.TfdsSource(builder, "train", seed=0, shuffle_buffer=10)
    epoch, source.read = source._epoch, [0]

    def count(example):
      tf.py_function(lambda: source.read.__setitem__(0, source.read[0] + 1), [], [])
      return example
    source._epoch = lambda e: epoch(e).map(count)
    return source

  straight = counted_source().records(0)
  labels = [next(straight)[3] for _ in range(340)]
  assert sorted(labels[:100]) == list(range(100)) and labels[:100] != labels[100:200]
  reads = {}
  for start in (20, 320):  # epoch 0.2 and 3.2
    source = counted_source()
    resumed = source.records(start)
    assert [next(resumed)[3] for _ in range(8)] == labels[start:start + 8]
    reads[start] = source.read[0]
  # The same records read either way: the 20 passed over, the 8 used, what
  # the shuffle buffer (10) holds and up to 16 that prefetching reads ahead
  # (timing-dependent); the former repeat().skip() read 320 + for epoch 3.2.
  for count in reads.values():
    assert 20 <= count <= 20 + 8 + 10 + 16, reads
