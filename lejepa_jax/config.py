"""Checking a run's config before anything compiles or is written, and the setup every
command shares.

`validate(config)` checks the config alone (keys against `config_schema.KEYS`, then values);
`prepare(config, devices)` adds what the devices and the data tell (batch sizes against the
mesh, splits present, channels) and returns the mesh, the sources, the step count and the
programs (`steps.build`) that `train`, `evaluate` and `plan` share. Every failure is one
`ConfigError` (or `sources.DataError`) whose message names the key and what to set.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from lejepa_jax import config_schema
from lejepa_jax import losses
from lejepa_jax import models
from lejepa_jax import optim
from lejepa_jax import sharding as sharding_lib
from lejepa_jax import sigreg
from lejepa_jax import stats
from lejepa_jax import steps
from lejepa_jax.data import host_resources
from lejepa_jax.data import sources
from lejepa_jax.config_schema import resolve
from lejepa_jax.evaluators import suite
from lejepa_jax.models import resnet

__all__ = ['ConfigError', 'check_data', 'check_divisible', 'crop_problems', 'prepare', 'resolve',
           'total_steps', 'validate']


class ConfigError(ValueError):
  """A config value the run cannot use; the message names the key and what to set instead.

  Raised before anything compiles or touches the workdir (`python -m lejepa_jax.main` prints
  it as one line and exits with status 2)."""


# ViT-only model keys and the value a ResNet config must leave them at.
VIT_ONLY_KEYS = {'patch_size': 0, 'depth': 0, 'mlp_dim': 0, 'num_heads': 0, 'num_registers': 0,
                 'drop_path_rate': 0.0, 'remat': 'none', 'attention': ''}


def resnet_problems(config) -> list[str]:
  """ViT keys set in a ResNet config (they would be ignored silently), a bad stem."""
  m = config.model
  out = [f'model.{key}={m[key]!r} applies to ViTs only: set --config.model.{key}={default!r} '
         f'for {m.variant}' for key, default in VIT_ONLY_KEYS.items() if m[key] != default]
  if m.stem not in resnet.STEMS:
    out.append(f'model.stem={m.stem!r}: one of {resnet.STEMS}')
  if m.conv not in resnet.CONVS:
    out.append(f'model.conv={m.conv!r}: one of {resnet.CONVS}')
  return out


def crop_problems(config) -> list[str]:
  """ViTs: crop sizes the patches tile; ResNets: ViT keys left set."""
  if resnet.is_resnet(config.model.variant):
    return resnet_problems(config)
  d, patch = config.data, config.model.patch_size
  out = []
  if patch < 1:
    return [f'model.patch_size={patch!r} must be a positive integer']
  views = [('data.global_size', d.global_size)]
  if d.num_local_views > 0:
    views.append(('data.local_size', d.local_size))
  for key, size in views:
    if size % patch:
      lower, upper = size // patch * patch, (size // patch + 1) * patch
      choices = f'{lower} or {upper}' if lower else f'{upper}'
      out.append(f'{key}={size} is not a multiple of model.patch_size={patch} (the patches must '
                 f'tile the crop): set --config.{key}={choices}, or change model.patch_size')
  return out


def validate(config) -> None:
  """Fails early with ONE ConfigError naming every bad key and what to set instead.

  Checks the config alone (no devices, no data, no files): unknown and missing keys
  against `config_schema.KEYS`, then values that would only fail (or mislead) later.
  `train_and_evaluate` adds the checks that need the devices and the data, all before
  the workdir is touched.
  """
  problems = config_schema.problems(config)
  problems += suite.problems(config)
  if problems:   # values of misspelt or missing keys cannot be checked meaningfully
    raise ConfigError('bad config: ' + '; '.join(problems))
  config = resolve(config)
  if config.loss_convention not in losses.CONVENTIONS:
    problems.append(f'loss_convention={config.loss_convention!r}: one of {losses.CONVENTIONS}')
  if config.loss_convention == 'convex' and not 0.0 <= config.lamb <= 1.0:
    problems.append(f'lamb={config.lamb}: must lie in [0, 1] with the convex convention '
                    '((1 - lamb) * inv + lamb * sigreg): set --config.lamb in [0, 1] (the paper '
                    'uses 0.05), or --config.loss_convention=additive for inv + lamb * sigreg')
  if config.sigreg.num_slices < 1 or config.sigreg.num_points < 2 or config.sigreg.t_max <= 0:
    problems.append('sigreg: num_slices >= 1, num_points >= 2 and t_max > 0 are required')
  statistic = steps.regulariser_options(config.sigreg)['statistic']
  if statistic not in stats.STATISTICS:
    problems.append(f'sigreg.statistic={statistic!r}: one of {stats.STATISTICS}')
  if config.sigreg.quadrature not in sigreg.QUADRATURES:
    problems.append(f'sigreg.quadrature={config.sigreg.quadrature!r}: one of {sigreg.QUADRATURES}')
  if not config.total_steps and not config.epochs:
    problems.append('total_steps and epochs are both 0: set --config.total_steps=N or '
                    '--config.epochs=N')
  if config.batch_size < 1 or config.eval.batch_size < 1:
    problems.append('batch_size and eval.batch_size must be >= 1')
  d = config.data
  if not sources.known_name(d.name):
    problems.append(f'data.name={d.name!r}: one of {sources.NAMES}')
  if d.labels not in sources.LABELS:
    problems.append(f'data.labels={d.labels!r}: one of {sources.LABELS}')
  elif d.labels == 'none' and [s for s in suite.specs(config) if not s.data]:
    names = [s.name for s in suite.specs(config) if not s.data]
    problems.append(f"data.labels='none' but evaluators {names} read config.data and need "
                    'labelled images: give each its own labelled set (evals.NAME.data, e.g. '
                    "dict(name='folder', dir=DIR, num_classes=N)), or pass '--config.evals={}' "
                    'to pretrain only')
  if d.num_global_views < 1:
    problems.append('data.num_global_views must be >= 1 (the invariance centre)')
  if d.num_local_views < 0:
    problems.append('data.num_local_views must be >= 0')
  problems.extend(crop_problems(config))
  for key in ('mean', 'std'):
    values = tuple(d[key]) if isinstance(d[key], (tuple, list)) else (d[key],)
    if len(values) != d.channels:
      problems.append(f'data.{key}={values} has {len(values)} values but data.channels='
                      f'{d.channels}: give one value per channel, e.g. '
                      f'--config.data.{key}="{(values * d.channels)[:d.channels]}"')
    elif key == 'std' and min(values) <= 0:
      problems.append(f'data.std={values}: every value must be > 0')
  if config.checkpoint_every < 1 or config.log_every < 1:
    problems.append('checkpoint_every and log_every must be >= 1')
  if config.checkpoint_max_to_keep < 1 or config.checkpoint_keep_every < 0:
    problems.append('checkpoint_max_to_keep must be >= 1 and checkpoint_keep_every >= 0 (0: none)')
  if config.eval.features and config.eval.features not in models.FEATURE_KINDS:
    problems.append(f'eval.features={config.eval.features!r}: one of '
                    f'{sorted(models.FEATURE_KINDS)}')
  elif not config.model.embedding_dim and (
      config.eval.features == 'head' or any(
          dict(e).get('features') == 'head' for e in config.evals.values() if hasattr(e, 'get'))):
    problems.append("features 'head' need a head: set model.embedding_dim > 0")
  if config.optim.weight_decay_on not in optim.WEIGHT_DECAY_ON:
    problems.append(f'optim.weight_decay_on={config.optim.weight_decay_on!r}: one of '
                    f'{optim.WEIGHT_DECAY_ON}')
  if config.nonfinite not in steps.NONFINITE_POLICIES:
    problems.append(f'nonfinite={config.nonfinite!r}: one of {steps.NONFINITE_POLICIES}')
  if config.nonfinite_max_skips < 1:
    problems.append('nonfinite_max_skips must be >= 1')
  if d.verify_images not in sources.VERIFY_MODES:
    problems.append(f'data.verify_images={d.verify_images!r}: one of {sources.VERIFY_MODES}')
  problems.extend(host_resources.problems(d))
  if problems:
    raise ConfigError('bad config: ' + '; '.join(problems))


def total_steps(config, train_size: int) -> int:
  config = resolve(config)
  if config.total_steps:
    return int(config.total_steps)
  if config.epochs:
    return max(1, int(config.epochs * train_size // config.batch_size))
  raise ConfigError('config needs total_steps or epochs: set --config.total_steps=N')


def check_divisible(config, dp: int, blocks: int) -> None:
  """Both batch sizes split over the dp devices and the `blocks` the processes read
  (`sharding.batch_feed(mesh).count`: the process count unless replicas span processes)."""
  problems = []
  for key, value in (('batch_size', config.batch_size), ('eval.batch_size', config.eval.batch_size)):
    if value % dp or value % blocks:
      step = int(np.lcm(dp, blocks))
      problems.append(
          f'{key}={value} must divide by the data-parallel size {dp} and the {blocks} blocks '
          f'the processes read: set --config.{key} to a multiple of {step} (e.g. '
          f'{max(step, value // step * step)}), or change mesh')
  if problems:
    raise ConfigError('bad config: ' + '; '.join(problems))


def check_data(config, train_source, test_source) -> None:
  """What only the data can tell: enough records, and the channels the config expects."""
  d = resolve(config).data
  for split, source in ((d.train_split, train_source), (d.test_split, test_source)):
    if not len(source):
      raise sources.MissingDataError(f'{d.name} split {split!r} under data.dir={d.dir!r} '
                                     'has no records: point data.dir at the data')
    channels = sources.image_channels(source)
    if channels != d.channels:
      raise ConfigError(f'data.channels={d.channels} but the images of {d.name} split {split!r} '
                        f'have {channels} channel(s): set --config.data.channels={channels} and '
                        f'give data.mean and data.std {channels} values each')
  unlabelled = [split for split, source in ((d.train_split, train_source),
                                            (d.test_split, test_source))
                if not getattr(source, 'labelled', True)]
  readers = [s.name for s in suite.specs(config) if not s.data]
  if unlabelled and readers:
    raise ConfigError(f'{d.name} split(s) {unlabelled} under data.dir={d.dir!r} have no labels '
                      f'(a .npy file, an .npz without "labels", or data.label_key=\'\') but '
                      f'evaluators {readers} need them: give the labels, give each evaluator '
                      "its own labelled set (evals.NAME.data), or pass '--config.evals={}' to "
                      'pretrain only')
  if len(train_source) < config.batch_size:
    raise ConfigError(f'batch_size={config.batch_size} is larger than the {len(train_source)} '
                      f'records of data.train_split={d.train_split!r}: lower --config.batch_size')


@dataclasses.dataclass(frozen=True)
class Prepared:
  """What `prepare` found and built: nothing written, nothing compiled yet."""
  config: Any                        # resolved: every key present (config_schema.resolve)
  mesh: Any
  feed: sharding_lib.Feed            # which block of each global batch this process reads
  train_source: Any
  test_source: Any
  total_steps: int
  programs: steps.Programs
  eval_sources: dict                 # (suite.data_key, split) -> source, for suite.Runner


def prepare(config, devices=None, *, train_source=None, test_source=None) -> Prepared:
  """validate, the mesh over `devices` (default: all), the batch sizes against it, the two
  splits (opened unless given) and what they hold, the step count and `steps.build`."""
  validate(config)
  config = resolve(config)
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  try:
    feed = sharding_lib.batch_feed(mesh)
  except sharding_lib.MeshFeedError as e:
    raise ConfigError(f'bad config: mesh={dict(config.mesh)}: {e}') from None
  check_divisible(config, sharding_lib.data_parallel_size(mesh), feed.count)
  d = config.data
  train_source = train_source or sources.get_source(d, d.train_split)
  test_source = test_source or sources.get_source(d, d.test_split)
  check_data(config, train_source, test_source)
  eval_sources = suite.open_sources(config, {d.train_split: train_source,
                                             d.test_split: test_source})
  steps_total = total_steps(config, len(train_source))
  return Prepared(config=config, mesh=mesh, feed=feed, train_source=train_source, test_source=test_source,
                  total_steps=steps_total, programs=steps.build(config, mesh, steps_total),
                  eval_sources=eval_sources)
