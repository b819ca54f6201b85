"""Reference points for the Fashion-MNIST result, measured with our probe protocol.

  python benchmarks/fmnist_baselines.py [--config=configs/fmnist.py]

Prints the frozen linear-probe and k-NN test top-1 of (a) raw pixels and (b) the
config's ViT at random initialisation (no pretraining): the figures a
pretrained encoder has to beat.
"""
from absl import app
import numpy as np
from ml_collections import config_flags

from lejepa_jax import steps
from lejepa_jax import sharding as sharding_lib
from lejepa_jax.data import sources
from lejepa_jax.evaluators import features as features_lib
from lejepa_jax.evaluators import suite

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/fmnist.py', 'Config file.')


def _probe_and_knn(name, train_features, test_features, config, mesh):
  """The config's linear_probe and knn evaluators (same options as a run's final evaluation)."""
  n_cls = config.data.num_classes
  out = {}
  for spec in suite.specs(config, ['linear_probe', 'knn']):
    evaluate = suite.TYPES[spec.type][0]
    out.update(evaluate(train_features, test_features, n_cls, mesh=mesh, seed=config.seed,
                        **spec.options))
  print(f'{name:<28s} linear probe top-1 {out["linear_probe_top1"]:.4f} '
        f'(lr {out["linear_probe_lr"]:g})   k-NN top-1 {out["knn_top1"]:.4f}', flush=True)


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
    feats = suite.Runner(config, programs, train_source=train_src,
                         test_source=test_src).features(steps.variables(state), 0)
    _probe_and_knn(f'random-init ViT ({config.model.variant})', *feats, config, mesh)


if __name__ == '__main__':
  app.run(main)
