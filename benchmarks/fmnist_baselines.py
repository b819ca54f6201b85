"""Reference points for the Fashion-MNIST result, measured with our probe protocol.

  python benchmarks/fmnist_baselines.py [--config=configs/fmnist.py]

Prints the frozen linear-probe and k-NN test top-1 of (a) raw pixels and (b) the
config's ViT at random initialisation (no pretraining): the figures a
pretrained encoder has to beat.
"""
from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from lejepa_jax import steps, train
from lejepa_jax import sharding as sharding_lib
from lejepa_jax.data import sources
from lejepa_jax.evaluators import features as features_lib
from lejepa_jax.evaluators import knn, linear_probe

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/fmnist.py', 'Config file.')


def _probe_and_knn(name, train_features, test_features, config, mesh):
  e = config.eval
  n_cls = config.data.num_classes
  lp = linear_probe.evaluate(train_features, test_features, n_cls, mesh=mesh,
                             lrs=tuple(e.probe_lrs), epochs=e.probe_epochs,
                             batch_size=e.probe_batch_size, weight_decay=e.probe_weight_decay,
                             seed=config.seed)
  kn = knn.evaluate(train_features, test_features, n_cls, mesh=mesh, k=e.knn_k,
                    temperature=e.knn_temperature)
  print(f'{name:<28s} linear probe top-1 {lp["linear_probe_top1"]:.4f} (lr {lp["linear_probe_lr"]:g})'
        f'   k-NN top-1 {kn["knn_top1"]:.4f}', flush=True)


def main(argv):
  del argv
  config = _CONFIG.value
  mesh = sharding_lib.make_mesh(config.get('mesh'))
  train_src = sources.get_source(config.data, config.data.train_split)
  test_src = sources.get_source(config.data, config.data.test_split)
  flat = lambda s: features_lib.from_numpy(
      s.images.reshape(len(s), -1).astype(np.float32) / 255.0, s.labels, mesh)
  _probe_and_knn('raw pixels', flat(train_src), flat(test_src), config, mesh)

  programs = steps.build(config, mesh, total_steps=1)
  with sharding_lib.activate(mesh):
    state = programs.init(np.int32(config.seed))
    feats = train.extract_features(
        config, programs, steps.variables(state))
    _probe_and_knn(f'random-init ViT ({config.model.variant})', *feats, config, mesh)


if __name__ == '__main__':
  app.run(main)
