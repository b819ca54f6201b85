"""Every config key the code reads: the table `config.validate` (lejepa_jax/config.py) checks
configs against.

A config file, or `--config.KEY=VALUE`, may only set keys listed here; anything else is
rejected before anything compiles or is written, naming the key and the closest known one
(a typo such as `optim.weight_decy` would otherwise be ignored silently, the run going on
with the default). Keys marked required must be present; the others are read with a
default (shown in brackets).

Values of the FREE_FORM keys are dicts taken whole (`mesh` axis sizes, the statistic's
keyword arguments in `sigreg.options`); their own keys are not checked here.

Adding a config key: read it in the code, add it here with one line saying what it does,
and set it in the configs that need it (tests/test_validation.py checks that every shipped
config passes and that every key here is set by at least one shipped config or is optional).
"""
from __future__ import annotations

import difflib

REQUIRED, OPTIONAL = True, False

# key -> (required, what it does)
KEYS: dict[str, tuple[bool, str]] = {
    'seed': (REQUIRED, 'seed of initialisation, data order and augmentation'),
    'batch_size': (REQUIRED, 'global batch (all processes); divisible by the data-parallel '
                             'devices and the process count'),
    'total_steps': (OPTIONAL, 'training steps [0: derived from epochs]'),
    'epochs': (OPTIONAL, 'epochs of the train split, when total_steps is 0'),
    'lamb': (REQUIRED, 'weight of SIGReg; in [0, 1] with the convex convention'),
    'loss_convention': (REQUIRED, "'convex': (1 - lamb) * inv + lamb * sigreg; 'additive': "
                                  'inv + lamb * sigreg'),
    'log_every': (REQUIRED, 'steps between metric lines'),
    'checkpoint_every': (REQUIRED, 'steps between checkpoints'),
    'checkpoint_max_to_keep': (OPTIONAL, 'newest checkpoints kept [2]'),
    'checkpoint_keep_every': (OPTIONAL, 'also keep every step % N == 0 for good [0: none]'),
    'nonfinite': (OPTIONAL, "'stop' or 'skip' on non-finite loss terms or gradients [stop]"),
    'nonfinite_max_skips': (OPTIONAL, 'skipped steps in a row that end the run [10]'),
    'mesh': (OPTIONAL, "free-form dict {'data', 'fsdp', 'tensor'} -> size, -1 = the rest "
                       "[{'data': -1}]"),
    # SIGReg
    'sigreg.num_slices': (REQUIRED, 'random 1-D projections per step'),
    'sigreg.t_max': (REQUIRED, 'upper end of the integration interval [0, t_max]'),
    'sigreg.num_points': (REQUIRED, 'quadrature knots on [0, t_max]'),
    'sigreg.quadrature': (OPTIONAL, 'a name in lejepa_jax.sigreg.QUADRATURES [trapezoid]'),
    'sigreg.statistic': (OPTIONAL, 'a name in lejepa_jax.stats.STATISTICS [epps_pulley]'),
    'sigreg.options': (OPTIONAL, 'free-form dict: keyword arguments of the statistic [{}]'),
    # data
    'data.name': (REQUIRED, "'fashion_mnist', 'tfds:NAME' or 'folder'"),
    'data.dir': (OPTIONAL, 'data directory (IDX files, TFDS data_dir, or the image folder)'),
    'data.image_key': (OPTIONAL, "TFDS feature holding the image ['image']"),
    'data.label_key': (OPTIONAL, "TFDS feature holding the label ['label']"),
    'data.verify_images': (OPTIONAL, "folder source: 'auto' (every file up to 50,000, else a "
                                     "sample of 50,000), 'all' or 'none' [auto]"),
    'data.resize_shorter': (OPTIONAL, 'folder source: resize on loading so the shorter side has '
                                      'N pixels [0: keep the size]'),
    'data.train_split': (REQUIRED, 'split to pretrain on (and fit the probes on)'),
    'data.test_split': (REQUIRED, 'split the probes are evaluated on'),
    'data.num_classes': (REQUIRED, 'classes of the probes'),
    'data.channels': (REQUIRED, 'image channels; the length of data.mean and data.std'),
    'data.mean': (REQUIRED, 'per-channel mean on a [0, 1] scale'),
    'data.std': (REQUIRED, 'per-channel standard deviation on a [0, 1] scale'),
    'data.num_global_views': (REQUIRED, 'global crops per image (>= 1)'),
    'data.num_local_views': (REQUIRED, 'local crops per image (>= 0)'),
    'data.global_size': (REQUIRED, 'global crop side in pixels; a multiple of model.patch_size'),
    'data.local_size': (REQUIRED, 'local crop side; a multiple of model.patch_size'),
    'data.global_scale': (REQUIRED, '(min, max) area fraction of global crops'),
    'data.local_scale': (REQUIRED, '(min, max) area fraction of local crops'),
    'data.eval_crop_fraction': (OPTIONAL, 'centre-crop fraction at evaluation [1.0]'),
    'data.num_threads': (OPTIONAL, "Grain read threads per reader (each worker process, or "
                                   "this process): 'auto' (from the CPU cores this process may "
                                   "use; lejepa_jax/data/host_resources.py) or N, capped at "
                                   "those cores [2]"),
    'data.prefetch': (OPTIONAL, 'Grain prefetch buffer [4]'),
    'data.num_workers': (OPTIONAL, "Grain worker processes of each training process: 'auto' "
                                   "(this process's cores - 1, none below 4 cores) or N, "
                                   "capped at those cores [0: none]"),
    'data.augment.flip_prob': (REQUIRED, 'horizontal flip probability'),
    'data.augment.jitter_prob': (REQUIRED, 'colour jitter probability'),
    'data.augment.brightness': (REQUIRED, 'colour jitter strength'),
    'data.augment.contrast': (REQUIRED, 'colour jitter strength'),
    'data.augment.saturation': (REQUIRED, 'colour jitter strength'),
    'data.augment.hue': (REQUIRED, 'colour jitter strength'),
    'data.augment.grayscale_prob': (REQUIRED, 'grayscale probability'),
    'data.augment.blur_prob': (REQUIRED, 'Gaussian blur probability'),
    'data.augment.blur_sigma': (REQUIRED, '(min, max) blur sigma in output pixels'),
    'data.augment.solarize_prob': (REQUIRED, 'solarize probability'),
    # model
    'model.variant': (REQUIRED, 'a row of the ViT table in lejepa_jax/models/vit.py'),
    'model.patch_size': (REQUIRED, 'patch side in pixels'),
    'model.width': (OPTIONAL, 'overrides the variant [0: the variant]'),
    'model.depth': (OPTIONAL, 'overrides the variant [0: the variant]'),
    'model.mlp_dim': (OPTIONAL, 'overrides the variant [0: the variant]'),
    'model.num_heads': (OPTIONAL, 'overrides the variant [0: the variant]'),
    'model.num_registers': (OPTIONAL, 'register tokens [0]'),
    'model.dtype': (OPTIONAL, 'activation dtype [float32]'),
    'model.remat': (OPTIONAL, 'rematerialisation policy [none]'),
    'model.drop_path_rate': (OPTIONAL, 'stochastic depth of the last block, linear from 0 at '
                                       'the first, per view, training only (timm) [0.0]'),
    'model.gelu': (OPTIONAL, "MLP activation: 'exact' (erf; torch's and timm's GELU) or 'tanh' "
                             '(the approximation; what runs made before this key used) [tanh]'),
    'model.scan': (OPTIONAL, 'scan over layers [True]'),
    'model.cls_only_last': (OPTIONAL, 'unrolled ViT: the last block computes only the CLS '
                                      'tokens (nothing else reads them) [True]'),
    'model.attention': (OPTIONAL, "dot_product_attention implementation ['': jax picks]"),
    'model.embedding_dim': (OPTIONAL, "> 0: a linear head width -> N on the final CLS (timm's "
                                      'num_classes head), the projector input [0: none]'),
    'model.online_probe_input': (OPTIONAL, "online probe's input: 'probe' (CLS of the last two "
                                           "blocks) or 'embedding' (the projector input) [probe]"),
    'model.projector_activation': (OPTIONAL, "'gelu' or 'relu' (torchvision MLP's) [gelu]"),
    'model.projector_hidden': (REQUIRED, 'hidden widths of the BatchNorm MLP projector'),
    'model.projector_out': (REQUIRED, 'projector output dimension (SIGReg acts here)'),
    # optimizer
    'optim.lr': (REQUIRED, 'peak learning rate'),
    'optim.warmup_steps': (REQUIRED, 'linear warmup steps before the cosine decay'),
    'optim.weight_decay': (REQUIRED, 'AdamW weight decay'),
    'optim.b1': (REQUIRED, 'AdamW beta1'),
    'optim.b2': (REQUIRED, 'AdamW beta2'),
    'optim.end_lr': (OPTIONAL, "absolute learning rate at the cosine's end for the network and "
                               "the probe alike (torch's eta_min) [-1: each one's lr / 1000]"),
    'optim.warmup_start_factor': (OPTIONAL, 'warmup starts at lr x this (torch LinearLR '
                                            'start_factor) [0.0]'),
    'optim.weight_decay_on': (OPTIONAL, "'kernels' (dense, attention and patch-embedding "
                                        "kernels only) or 'all' (every parameter, as torch's "
                                        'AdamW on net.parameters()) [kernels]'),
    'optim.clip_norm': (OPTIONAL, 'global gradient-norm clipping [0: none]'),
    'optim.probe_lr': (REQUIRED, 'learning rate of the online probe'),
    'optim.probe_weight_decay': (REQUIRED, 'weight decay of the online probe'),
    # evaluation
    'eval.batch_size': (REQUIRED, 'feature-extraction batch; divisible like batch_size'),
    'eval.max_examples': (OPTIONAL, 'cap per split: that many images drawn with `seed`, '
                                    'stratified by class where the labels are known without '
                                    'decoding (folders, Fashion-MNIST) [0: the full splits]'),
    'eval.features': (OPTIONAL, "every evaluator's features, over its own: 'probe' (CLS of the "
                                "last two blocks), 'embedding' (final CLS), 'head' or "
                                "'projection' ['': each evaluator's own or its protocol's, "
                                'evaluators/suite.py]'),
    # embedding diagnostics (lejepa_jax/diagnostics.py) and plots
    'diagnostics.every': (OPTIONAL, 'steps between embedding diagnostics (RankMe, spectrum, '
                                    'SIGReg of the backbone, variances) [0: off]'),
    'diagnostics.num_images': (OPTIONAL, 'N test images drawn with `seed` (stratified like '
                                         'eval.max_examples), a fixed batch [512]'),
    'diagnostics.min_rank_fraction': (OPTIONAL, 'collapse warning below this x max RankMe [0.1]'),
    'diagnostics.min_proj_var': (OPTIONAL, 'collapse warning below this projector variance [0.1]'),
    'diagnostics.plots': (OPTIONAL, 'PNG plots into WORKDIR/plots/ at the end [True]'),
    'evals': (OPTIONAL, 'free-form dict NAME -> {type, every, max_examples, options...}: the '
                        'evaluators (lejepa_jax/evaluators/suite.py checks their options) '
                        '[linear_probe and knn at the end]'),
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
  for key, (required, what) in KEYS.items():
    if required and key not in have:
      out.append(f'{key} is missing ({what}): set it in the config file')
  if 'total_steps' not in have and 'epochs' not in have:
    out.append('total_steps or epochs is required: set one in the config file')
  return out
