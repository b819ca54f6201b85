"""Every config key the code reads, with its default: the one table that `resolve` fills
configs from and `config.validate` (lejepa_jax/config.py) checks them against.

A config file, or `--config.KEY=VALUE`, may only set keys listed here; anything else is
rejected before anything compiles or is written, naming the key and the closest known one
(a typo such as `optim.weight_decy` would otherwise be ignored silently, the run going on
with the default). REQUIRED keys must be present; `resolve(config)` gives every other key
its default here (the code reads them as attributes, never with a default of its own).

Values of the FREE_FORM keys are dicts taken whole (`mesh` axis sizes, the statistic's
keyword arguments in `sigreg.options`, the evaluators); their own keys are not checked here.

Adding a config key: read it in the code, add it here with its default and one line saying
what it does, and set it in the configs that need it (tests/test_validation.py checks that
every shipped config passes and that every key here is set by a shipped config or has a
default).
"""
from __future__ import annotations

import copy
import difflib
from typing import Any, NamedTuple


class _Required:
  def __repr__(self):
    return 'REQUIRED'


REQUIRED: Any = _Required()   # the default of a key every config must set


class Key(NamedTuple):
  default: Any      # REQUIRED, or the value `resolve` gives a config that lacks the key
  meaning: str

  @property
  def required(self) -> bool:
    return self.default is REQUIRED


# key -> Key(default or REQUIRED, what it does; what a special value means)
KEYS: dict[str, Key] = {
    'seed': Key(REQUIRED, 'seed of initialisation, data order and augmentation'),
    'batch_size': Key(REQUIRED, 'global batch (all processes); divisible by the data-parallel '
                                'devices and the process count'),
    'total_steps': Key(0, 'training steps (0: derived from epochs)'),
    'epochs': Key(0, 'epochs of the train split, when total_steps is 0'),
    'lamb': Key(REQUIRED, 'weight of SIGReg; in [0, 1] with the convex convention'),
    'loss_convention': Key(REQUIRED, "'convex': (1 - lamb) * inv + lamb * sigreg; 'additive': "
                                  'inv + lamb * sigreg'),
    'log_every': Key(REQUIRED, 'steps between metric lines'),
    'checkpoint_every': Key(REQUIRED, 'steps between checkpoints'),
    'checkpoint_max_to_keep': Key(2, 'newest checkpoints kept'),
    'checkpoint_keep_every': Key(0, 'also keep every step % N == 0 for good (0: none)'),
    'nonfinite': Key('stop', "'stop' or 'skip' on non-finite loss terms or gradients"),
    'nonfinite_max_skips': Key(10, 'skipped steps in a row that end the run'),
    'mesh': Key({'data': -1}, "free-form dict {'data', 'fsdp', 'tensor'} -> size, -1 = the rest"),
    # SIGReg
    'sigreg.num_slices': Key(REQUIRED, 'random 1-D projections per step'),
    'sigreg.t_max': Key(REQUIRED, 'upper end of the integration interval [0, t_max]'),
    'sigreg.num_points': Key(REQUIRED, 'quadrature knots on [0, t_max]'),
    'sigreg.quadrature': Key('trapezoid', 'a name in lejepa_jax.sigreg.QUADRATURES'),
    'sigreg.statistic': Key('epps_pulley', 'a name in lejepa_jax.stats.STATISTICS'),
    'sigreg.options': Key({}, 'free-form dict: keyword arguments of the statistic'),
    # data
    'init_from': Key('', 'an export (python -m lejepa_jax.export), a training workdir (its newest '
                     'checkpoint), or a timm ViT / ResNet state dict file to start the encoder '
                     "from ('': random; a checkpoint in this run's workdir wins)"),
    'data.name': Key(REQUIRED, "'fashion_mnist', 'tfds:NAME', 'folder' or 'arrays' "
                     "(DIR/SPLIT.npz with images and optional labels, or DIR/SPLIT.npy)"),
    'data.labels': Key('auto', "'auto': the labels the source has (class folders, an .npz "
                       "'labels' array, the TFDS label_key); 'none': pretrain on unlabelled "
                       "images (folder: every image at any depth; evaluators then refused)"),
    'data.dir': Key('', 'data directory (IDX files, TFDS data_dir, or the image folder)'),
    'data.image_key': Key('image', "TFDS feature holding the image"),
    'data.label_key': Key('label', "TFDS feature holding the label"),
    'data.verify_images': Key('auto', "folder source: 'auto' (every file up to 50,000, else a "
                                     "sample of 50,000), 'all' or 'none'"),
    'data.resize_shorter': Key(0, 'folder source: resize on loading so the shorter side has '
                                      'N pixels (0: keep the size)'),
    'data.train_split': Key(REQUIRED, 'split to pretrain on (and fit the probes on)'),
    'data.test_split': Key(REQUIRED, 'split the probes are evaluated on'),
    'data.num_classes': Key(REQUIRED, 'classes of the probes'),
    'data.channels': Key(REQUIRED, 'image channels; the length of data.mean and data.std'),
    'data.mean': Key(REQUIRED, 'per-channel mean on a [0, 1] scale'),
    'data.std': Key(REQUIRED, 'per-channel standard deviation on a [0, 1] scale'),
    'data.num_global_views': Key(REQUIRED, 'global crops per image (>= 1)'),
    'data.num_local_views': Key(REQUIRED, 'local crops per image (>= 0)'),
    'data.global_size': Key(REQUIRED, 'global crop side in pixels; ViTs: a multiple of '
                                      'model.patch_size'),
    'data.local_size': Key(REQUIRED, 'local crop side; ViTs: a multiple of model.patch_size'),
    'data.global_scale': Key(REQUIRED, '(min, max) area fraction of global crops'),
    'data.local_scale': Key(REQUIRED, '(min, max) area fraction of local crops'),
    'data.eval_crop_fraction': Key(1.0, 'centre-crop fraction at evaluation'),
    'data.num_threads': Key(2, "Grain read threads per reader (each worker process, or "
                                   "this process): 'auto' (from the CPU cores this process may "
                                   "use; lejepa_jax/data/host_resources.py) or N, capped at "
                                   "those cores"),
    'data.prefetch': Key(4, 'Grain prefetch buffer'),
    'data.num_workers': Key(0, "Grain worker processes of each training process: 'auto' "
                                   "(this process's cores - 1, none below 4 cores) or N, "
                                   "capped at those cores (0: none)"),
    'data.augment.flip_prob': Key(REQUIRED, 'horizontal flip probability'),
    'data.augment.jitter_prob': Key(REQUIRED, 'colour jitter probability'),
    'data.augment.brightness': Key(REQUIRED, 'colour jitter strength'),
    'data.augment.contrast': Key(REQUIRED, 'colour jitter strength'),
    'data.augment.saturation': Key(REQUIRED, 'colour jitter strength'),
    'data.augment.hue': Key(REQUIRED, 'colour jitter strength'),
    'data.augment.grayscale_prob': Key(REQUIRED, 'grayscale probability'),
    'data.augment.blur_prob': Key(REQUIRED, 'Gaussian blur probability'),
    'data.augment.blur_sigma': Key(REQUIRED, '(min, max) blur sigma in output pixels'),
    'data.augment.solarize_prob': Key(REQUIRED, 'solarize probability'),
    # model
    'model.variant': Key(REQUIRED, 'a row of the ViT table in lejepa_jax/models/vit.py, or '
                         "'resnet18', 'resnet34', 'resnet50' (lejepa_jax/models/resnet.py)"),
    'model.patch_size': Key(0, 'ViT patch side in pixels (required for ViTs; ResNets: 0)'),
    'model.stem': Key('imagenet', "ResNets: 'imagenet' (7x7 stride-2 conv + max pool) or "
                      "'cifar' (3x3 stride-1 conv, no pool: for images of about 32 px)"),
    'model.conv': Key('xla', "ResNets: 'xla' (XLA's convolution) or 'matmul' (one matmul per "
                      'kernel tap: the same function, 2-10x faster on XLA:CPU; '
                      'lejepa_jax/models/conv.py)'),
    'model.width': Key(0, 'overrides the variant (0: the variant); ResNets: the first '
                      "stage's channels (64)"),
    'model.depth': Key(0, 'overrides the variant (0: the variant)'),
    'model.mlp_dim': Key(0, 'overrides the variant (0: the variant)'),
    'model.num_heads': Key(0, 'overrides the variant (0: the variant)'),
    'model.num_registers': Key(0, 'register tokens'),
    'model.dtype': Key('float32', 'activation dtype'),
    'model.remat': Key('none', 'rematerialisation policy'),
    'model.drop_path_rate': Key(0.0, 'stochastic depth of the last block, linear from 0 at '
                                       'the first, per view, training only (timm)'),
    'model.gelu': Key('tanh', "MLP activation: 'exact' (erf; torch's and timm's GELU) or 'tanh' "
                             '(the approximation; what runs made before this key used)'),
    'model.scan': Key(True, 'scan over layers'),
    'model.cls_only_last': Key(True, 'unrolled ViT: the last block computes only the CLS '
                                      'tokens (nothing else reads them)'),
    'model.attention': Key('', "dot_product_attention implementation ('': jax picks)"),
    'model.embedding_dim': Key(0, "> 0: a linear head width -> N on the final CLS (timm's "
                                      'num_classes head), the projector input (0: none)'),
    'model.online_probe_input': Key('probe', "online probe's input: 'probe' (CLS of the last two "
                                           "blocks) or 'embedding' (the projector input)"),
    'model.projector_activation': Key('gelu', "'gelu' or 'relu' (torchvision MLP's)"),
    'model.projector_hidden': Key(REQUIRED, 'hidden widths of the BatchNorm MLP projector'),
    'model.projector_out': Key(REQUIRED, 'projector output dimension (SIGReg acts here)'),
    # optimizer
    'optim.lr': Key(REQUIRED, 'peak learning rate'),
    'optim.warmup_steps': Key(REQUIRED, 'linear warmup steps before the cosine decay'),
    'optim.weight_decay': Key(REQUIRED, 'AdamW weight decay'),
    'optim.b1': Key(REQUIRED, 'AdamW beta1'),
    'optim.b2': Key(REQUIRED, 'AdamW beta2'),
    'optim.end_lr': Key(-1.0, "absolute learning rate at the cosine's end for the network and "
                               "the probe alike (torch's eta_min) (-1: each one's lr / 1000)"),
    'optim.warmup_start_factor': Key(0.0, 'warmup starts at lr x this (torch LinearLR '
                                            'start_factor)'),
    'optim.weight_decay_on': Key('kernels', "'kernels' (dense, attention and patch-embedding "
                                        "kernels only) or 'all' (every parameter, as torch's "
                                        'AdamW on net.parameters())'),
    'optim.clip_norm': Key(0.0, 'global gradient-norm clipping (0: none)'),
    'optim.probe_lr': Key(REQUIRED, 'learning rate of the online probe'),
    'optim.probe_weight_decay': Key(REQUIRED, 'weight decay of the online probe'),
    # evaluation
    'eval.batch_size': Key(REQUIRED, 'feature-extraction batch; divisible like batch_size'),
    'eval.max_examples': Key(0, 'cap per split: that many images drawn with `seed`, '
                                    'stratified by class where the labels are known without '
                                    'decoding (folders, Fashion-MNIST) (0: the full splits)'),
    'eval.features': Key('', "every evaluator's features, over its own: 'probe' (CLS of the "
                                "last two blocks), 'embedding' (final CLS), 'head' or "
                                "'projection' ('': each evaluator's own or its protocol's, "
                                'evaluators/suite.py)'),
    # embedding diagnostics (lejepa_jax/diagnostics.py) and plots
    'diagnostics.every': Key(0, 'steps between embedding diagnostics (RankMe, spectrum, '
                                    'SIGReg of the backbone, variances) (0: off)'),
    'diagnostics.num_images': Key(512, 'N test images drawn with `seed` (stratified like '
                                         'eval.max_examples), a fixed batch'),
    'diagnostics.min_rank_fraction': Key(0.1, 'collapse warning below this x max RankMe'),
    'diagnostics.min_proj_var': Key(0.1, 'collapse warning below this projector variance'),
    'diagnostics.plots': Key(True, 'PNG plots into WORKDIR/plots/ at the end'),
    'evals': Key({'linear_probe': {'type': 'linear_probe'}, 'knn': {'type': 'knn'}},
                 'free-form dict NAME -> {type, every, max_examples, features, options...}: '
                 'the evaluators (lejepa_jax/evaluators/suite.py checks them); by default '
                 "the paper's frozen protocol at the end of training"),
}

FREE_FORM = frozenset({'mesh', 'sigreg.options', 'evals'})
SCHEMA_FILE = 'lejepa_jax/config_schema.py'


def flatten(config, prefix: str = '') -> list[str]:
  """Dotted names of the leaves of a ConfigDict (or dict); FREE_FORM values are leaves."""
  keys = []
  for name, value in config.items():
    key = prefix + str(name)
    if key not in FREE_FORM and hasattr(value, 'items'):
      keys.extend(flatten(value, key + '.'))
    else:
      keys.append(key)
  return keys


def closest(key: str) -> str | None:
  """The known key nearest to `key` (same section preferred), or None."""
  section = key.rpartition('.')[0]
  same = [k for k in KEYS if k.rpartition('.')[0] == section]
  for pool, cutoff in ((same, 0.6), (list(KEYS), 0.75)):
    match = difflib.get_close_matches(key, pool, n=1, cutoff=cutoff)
    if match:
      return match[0]
  return None


def describe_unknown(key: str) -> str:
  """'optim.weight_decy is not a known config key (did you mean optim.weight_decay?)...'."""
  guess = closest(key)
  hint = f'did you mean {guess}? ' if guess else ''
  return (f'{key} is not a known config key ({hint}the known keys are listed in '
          f'{SCHEMA_FILE}): fix or remove it')


def problems(config) -> list[str]:
  """Unknown keys and missing required keys of `config`, one message each."""
  present = flatten(config)
  out = [describe_unknown(k) for k in present if k not in KEYS]
  have = set(present)
  for key, spec in KEYS.items():
    if spec.required and key not in have:
      out.append(f'{key} is missing ({spec.meaning}): set it in the config file')
  if 'total_steps' not in have and 'epochs' not in have:
    out.append('total_steps or epochs is required: set one in the config file')
  return out


def _lookup(node, parts):
  for part in parts:
    if not hasattr(node, 'items') or part not in node:
      return None
    node = node[part]
  return node


def resolve(config, section: str = ''):
  """`config` with every key it lacks (or holds as None) set to its default in KEYS.

  `section` resolves a part of a config ('data' for config.data). Returns `config` itself
  when nothing is missing, else a copy (a ConfigDict); REQUIRED keys are left to `problems`.
  """
  prefix = section + '.' if section else ''
  missing = {k[len(prefix):]: spec.default for k, spec in KEYS.items()
             if k.startswith(prefix) and not spec.required
             and _lookup(config, k[len(prefix):].split('.')) is None}
  if not missing:
    return config
  import ml_collections   # here: the exported encoder's loader imports this module without it
  out = (copy.deepcopy(config) if isinstance(config, ml_collections.ConfigDict)
         else ml_collections.ConfigDict(config))
  with out.unlocked():
    for key, default in missing.items():
      *sections, leaf = key.split('.')
      node = out
      for part in sections:
        if node.get(part) is None:
          node[part] = ml_collections.ConfigDict()
        node = node[part]
      node[leaf] = copy.deepcopy(default)
  return out
