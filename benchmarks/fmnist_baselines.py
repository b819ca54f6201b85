"""Reference points for the Fashion-MNIST result, measured with our probe protocol.

  python benchmarks/fmnist_baselines.py [--config=configs/fmnist.py]

Prints the frozen linear-probe and k-NN test top-1 of (a) raw pixels and (b) the
config's ViT at random initialisation (no pretraining): the figures a
pretrained encoder has to beat.
"""
from absl import app
from absl import flags
import flax.linen as nn
import jax
import numpy as np
from ml_collections import config_flags

from lejepa_jax import models, optim, train
from lejepa_jax import sharding as sharding_lib
from lejepa_jax.data import sources
from lejepa_jax.evaluators import knn, linear_probe

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/fmnist.py', 'Config file.')


def _probe_and_knn(name, train_x, train_y, test_x, test_y, config):
  e = config.eval
  n_cls = config.data.num_classes
  lp = linear_probe.evaluate(train_x, train_y, test_x, test_y, n_cls, lrs=tuple(e.probe_lrs),
                             epochs=e.probe_epochs, batch_size=e.probe_batch_size,
                             weight_decay=e.probe_weight_decay, seed=config.seed)
  kn = knn.evaluate(train_x, train_y, test_x, test_y, n_cls, k=e.knn_k,
                    temperature=e.knn_temperature)
  print(f'{name:<28s} linear probe top-1 {lp["linear_probe_top1"]:.4f} (lr {lp["linear_probe_lr"]:g})'
        f'   k-NN top-1 {kn["knn_top1"]:.4f}', flush=True)


def main(argv):
  del argv
  config = _CONFIG.value
  train_src = sources.get_source(config.data, config.data.train_split)
  test_src = sources.get_source(config.data, config.data.test_split)
  flat = lambda s: (s.images.reshape(len(s), -1).astype(np.float32) / 255.0, s.labels)
  _probe_and_knn('raw pixels', *flat(train_src), *flat(test_src), config)

  mesh = sharding_lib.make_mesh(config.get('mesh'))
  model = models.build_model(config)
  tx = optim.make_optimizer(config, 1)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.DEFAULT_RULES):
    state, _ = train.create_train_state(config, model, tx, mesh)
    feats = train.extract_features(config, model, state, mesh)
  (tr_x, tr_y), (te_x, te_y) = feats
  _probe_and_knn(f'random-init ViT ({config.model.variant})', tr_x, tr_y, te_x, te_y, config)


if __name__ == '__main__':
  app.run(main)
