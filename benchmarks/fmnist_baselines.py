"""Reference points for the Fashion-MNIST result, measured with our probe protocol.

  python benchmarks/fmnist_baselines.py [--config=configs/fmnist.py] [--max_examples=0] [--quick]

Prints the frozen linear-probe and k-NN test top-1 of (a) raw pixels and (b) the
config's ViT at random initialisation (no pretraining): the figures a
pretrained encoder has to beat. --max_examples=N (--quick: 5,000) caps both splits at N
images drawn with the config's seed, as eval.max_examples does.
"""
from absl import app
from absl import flags
import numpy as np
from ml_collections import config_flags

from lejepa_jax import steps
from lejepa_jax import sharding as sharding_lib
from lejepa_jax.data import sources
from lejepa_jax.evaluators import features as features_lib
from lejepa_jax.evaluators import suite

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/fmnist.py', 'Config file.')
_MAX = flags.DEFINE_integer('max_examples', 0, 'Images per split (0: all).')
_QUICK = flags.DEFINE_bool('quick', False, 'An answer in under 3 minutes (5,000 images per split)')


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
  cap = _MAX.value or (5000 if _QUICK.value else 0)
  train_src, test_src = (sources.get_source(config.data, split)
                         for split in (config.data.train_split, config.data.test_split))
  if cap:
    train_src, test_src = (sources.sample(s, cap, seed=config.seed) for s in (train_src, test_src))
    print(f'{cap} images per split')
  def flat(source):
    images = np.stack([np.asarray(source[i]['image']) for i in range(len(source))])
    labels = np.asarray([source[i]['label'] for i in range(len(source))])
    return features_lib.from_numpy(images.reshape(len(source), -1).astype(np.float32) / 255.0,
                                   labels, mesh)
  _probe_and_knn('raw pixels', flat(train_src), flat(test_src), config, mesh)

  programs = steps.build(config, mesh, total_steps=1)
  with sharding_lib.activate(mesh):
    state = programs.init(np.int32(config.seed))
    feats = suite.Runner(config, programs, train_source=train_src,
                         test_source=test_src).features(steps.variables(state), 0)
    _probe_and_knn(f'random-init ViT ({config.model.variant})', *feats, config, mesh)


if __name__ == '__main__':
  app.run(main)
