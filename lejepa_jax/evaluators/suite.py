"""The evaluators a run uses, from `config.evals`, and the runner that feeds them features.

config.evals maps a name to one evaluator (big_vision style):

    config.evals.linear_probe = dict(type='linear_probe', every=0, lrs=(1e-2, 3e-2), ...)
    config.evals.knn = dict(type='knn', every=500, k=20, ks=(10, 20, 50))
    config.evals.fewshot = dict(type='fewshot', every=0, shots=(1, 5, 10, 25), seeds=3)

`type` is a key of TYPES; `every` > 0 also runs it every that many training steps (it
always runs at the end of training and in `python -m lejepa_jax.evaluate`);
`max_examples` (> 0) caps both splits for it (default: eval.max_examples) to that many
images drawn with config.seed (`sources.sample`: stratified by class where the source knows
its labels, so a folder stored in class order keeps every class; the same images on every
process and at every evaluation); the other keys are the keyword options of the type's
`evaluate`. Every evaluator has the same interface: `evaluate(train: Features, test:
Features, num_classes, *, mesh, seed, **options) -> {'TYPE_KEY': float}`, and its results
are logged as `eval/NAME_KEY` (so the evaluator named linear_probe writes
eval/linear_probe_top1).

Data (`data`, a dict of config.data keys, EVALUATOR_DATA_KEYS): an evaluator reads
config.data (default) or that with its `data` keys replaced: another labelled set for a
transfer or in-domain comparison, or labelled images beside an unlabelled pretraining pool
(data.labels='none'), e.g. data=dict(name='folder', dir='/data/labelled', num_classes=10).
The image size and channels stay the model's (the evaluation crop resizes to
data.global_size; folders convert to data.channels). Its splits are opened, and checked for
labels, before anything is written.

Features (`features`, a kind of `models.FEATURE_KINDS`): by default each evaluator reads
those of the protocol it follows (PROTOCOL_FEATURES): the linear probe the paper's
concatenated CLS tokens of the last two blocks ('probe'; the authors' README), k-NN and
few-shot the final-LayerNorm CLS token ('embedding'; DINO's k-NN protocol, Caron et al. 2021,
section 4.1 / their eval_knn.py, which L2-normalises it, as knn.py and fewshot.py do).
An evaluator's own `features` option overrides its protocol's; `eval.features` set to a kind
overrides both for every evaluator (a re-evaluation on other features), and the results it
moves off an evaluator's own features are logged as eval/KIND/NAME_KEY, never mixed up with
the usual ones. The online probe always reads what it was trained on.
Evaluators due at the same step with the same cap share one feature extraction (one encoder
pass yields every kind they need).
"""
from __future__ import annotations

import copy
import difflib
import json
import time
from typing import Any, NamedTuple

from absl import logging

from lejepa_jax import config_schema
from lejepa_jax import preemption
from lejepa_jax import sharding as sharding_lib
from lejepa_jax import models
from lejepa_jax.data import pipeline
from lejepa_jax.data import sources
from lejepa_jax.evaluators import features as features_lib
from lejepa_jax.evaluators import fewshot
from lejepa_jax.evaluators import knn
from lejepa_jax.evaluators import linear_probe
from lejepa_jax.evaluators import online_probe

# type -> (evaluate function, its options with their defaults)
TYPES: dict[str, tuple[Any, dict]] = {
    'linear_probe': (linear_probe.evaluate, dict(
        lrs=(1e-3, 3e-3, 1e-2), epochs=50, batch_size=1024, weight_decay=1e-6,
        holdout_fraction=0.1)),
    'knn': (knn.evaluate, dict(k=20, ks=(), temperature=0.07, chunk=1024)),
    'fewshot': (fewshot.evaluate, dict(
        shots=(1, 5, 10, 25), seeds=3, l2_regs=(1e-3, 1e-2, 1e-1, 1.0, 10.0), val_examples=1000)),
    # The head trained online during pretraining, on the test split (reads no training split).
    'online_probe': (online_probe.evaluate, {}),
}
# Types that read only the test split's features.
TEST_ONLY = frozenset({'online_probe'})
# Options of every evaluator besides `type`, with their defaults (see Spec).
ENTRY_DEFAULTS = {'every': 0, 'max_examples': 0, 'features': '', 'data': {}}
# The keys of config.data an evaluator's `data` may replace (the size and channels are the model's).
EVALUATOR_DATA_KEYS = ('name', 'dir', 'train_split', 'test_split', 'num_classes', 'image_key',
                       'label_key', 'verify_images', 'resize_shorter', 'eval_crop_fraction',
                       'mean', 'std')
COMMON = ('type', *ENTRY_DEFAULTS)
# type -> the features of the protocol it follows (see the module docstring).
PROTOCOL_FEATURES = {'linear_probe': 'probe', 'knn': 'embedding', 'fewshot': 'embedding'}


def online_probe_kind(config) -> str:
  """The features the online probe is trained on (models.ONLINE_PROBE_INPUTS)."""
  model = config_schema.resolve(config).model
  if model.online_probe_input == 'probe':
    return 'probe'
  return 'head' if model.embedding_dim else 'embedding'


class Spec(NamedTuple):
  name: str
  type: str
  every: int            # 0: only at the end (and in `evaluate`)
  max_examples: int     # 0: eval.max_examples
  options: dict
  features: str = ''    # a kind of models.FEATURE_KINDS ('': the protocol's)
  data: dict = {}       # config.data keys it replaces ({}: config.data itself)


def data_key(spec: Spec) -> str:
  """'' for config.data, else a stable text of the evaluator's own data (one source each)."""
  return json.dumps(spec.data, sort_keys=True, default=str) if spec.data else ''


def data_of(config, spec: Spec):
  """The data config `spec` reads: config.data with its `data` keys replaced."""
  d = config_schema.resolve(config.data, 'data')
  if not spec.data:
    return d
  d = copy.deepcopy(d)
  with d.unlocked():
    d.labels = 'auto'        # an evaluator reads labels, whatever the pretraining pool has
    for key, value in spec.data.items():
      d[key] = tuple(value) if isinstance(value, list) else value
  return d


def own_features(spec: Spec) -> str:
  """The features `spec` reads by its own configuration: its `features`, else its protocol's."""
  return spec.features or PROTOCOL_FEATURES.get(spec.type, '')


def feature_kind(config, spec: Spec) -> str:
  """The features `spec` reads: eval.features when set (a re-evaluation on other features),
  else its own (own_features). The online probe always reads those it was trained on."""
  if spec.type == 'online_probe':
    return online_probe_kind(config)
  return config_schema.resolve(config).eval.features or own_features(spec)


def feature_kinds(config, run_specs) -> tuple[str, ...]:
  """The kinds one encoder pass extracts for `run_specs` (in order, each once); without
  evaluators those of Programs.features (eval.features, else 'probe')."""
  kinds = tuple(dict.fromkeys(feature_kind(config, s) for s in run_specs))
  return kinds or (config_schema.resolve(config).eval.features or 'probe',)


def metric_prefix(config, spec: Spec) -> str:
  """'eval/' for the evaluator's own features, 'eval/KIND/' when eval.features moved it to
  another KIND, so such figures are never mixed up with its usual ones."""
  kind = feature_kind(config, spec)
  return 'eval/' if spec.type == 'online_probe' or kind == own_features(spec) else f'eval/{kind}/'


def _entries(config) -> dict:
  """NAME -> the evaluator's entry as written (config_schema's default without `evals`)."""
  evals = config_schema.resolve(config).evals
  return {k: dict(v) if hasattr(v, 'items') else v for k, v in evals.items()}


def problems(config) -> list[str]:
  """What is wrong with config.evals, one message per problem, naming the key."""
  out = []
  evals = config.get('evals')
  if evals is not None and not hasattr(evals, 'items'):
    return [f'evals={evals!r} must map names to evaluators, e.g. '
            "{'knn': {'type': 'knn', 'every': 500}}"]
  for name, entry in _entries(config).items():
    if not hasattr(entry, 'items'):
      out.append(f'evals.{name}={entry!r} must be a dict with a type')
      continue
    kind = entry.get('type')
    if kind not in TYPES:
      out.append(f'evals.{name}.type={kind!r}: one of {sorted(TYPES)}')
      continue
    allowed = list(COMMON) + list(TYPES[kind][1])
    for key in entry:
      if key not in allowed:
        guess = difflib.get_close_matches(key, allowed, n=1)
        hint = f' (did you mean {guess[0]}?)' if guess else ''
        out.append(f'evals.{name}.{key} is not an option of a {kind} evaluator{hint}; '
                   f'its options: {", ".join(allowed)}')
    entry = {**ENTRY_DEFAULTS, **entry}
    for key in ('every', 'max_examples'):
      if not isinstance(entry[key], int) or entry[key] < 0:
        out.append(f'evals.{name}.{key}={entry[key]!r} must be an integer >= 0')
    if entry['features'] and entry['features'] not in models.FEATURE_KINDS:
      out.append(f'evals.{name}.features={entry["features"]!r}: one of {sorted(models.FEATURE_KINDS)}')
    data = entry['data']
    if not hasattr(data, 'items'):
      out.append(f'evals.{name}.data={data!r} must be a dict of data keys, e.g. '
                 "dict(name='folder', dir='/data/labelled', num_classes=10)")
    elif data and kind == 'online_probe':
      out.append(f'evals.{name}.data: the online probe reads the classes it was trained on '
                 '(config.data); give other data to a linear_probe, knn or fewshot evaluator')
    else:
      for key in data:
        if key not in EVALUATOR_DATA_KEYS:
          out.append(f'evals.{name}.data.{key} cannot be set per evaluator; its keys: '
                     f'{", ".join(EVALUATOR_DATA_KEYS)}')
      source = str(data.get('name', 'fashion_mnist'))    # without a name: config.data's
      if not sources.known_name(source):
        out.append(f'evals.{name}.data.name={source!r}: one of {sources.NAMES}')
  return out


def specs(config, names=None) -> list[Spec]:
  """The evaluators of config.evals (all, or those named in `names`, in config order)."""
  entries = _entries(config)
  if names:
    missing = [n for n in names if n not in entries]
    if missing:
      raise KeyError(f'no evaluator named {", ".join(missing)} in config.evals '
                     f'(it has {", ".join(entries)})')
  out = []
  for name, entry in entries.items():
    if names and name not in names:
      continue
    options = dict(TYPES[entry['type']][1])
    options.update({k: v for k, v in entry.items() if k not in COMMON})
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    entry = {**ENTRY_DEFAULTS, **entry}
    out.append(Spec(name, entry['type'], int(entry['every']), int(entry['max_examples']),
                    options, entry['features'] or '', dict(entry['data'] or {})))
  return out


def open_sources(config, main: dict) -> dict:
  """(data_key, split) -> source for every evaluator's splits; `main` holds config.data's
  {split: source}. The evaluators' own data are opened here, once each, and refused with a
  DataError when a split is empty or unlabelled (before anything is written)."""
  out = {('', split): source for split, source in main.items()}
  for spec in specs(config):
    key, d = data_key(spec), data_of(config, spec)
    for split in (d.test_split,) if spec.type in TEST_ONLY else (d.train_split, d.test_split):
      if (key, split) in out:
        continue
      try:
        source = sources.get_source(d, split)
      except sources.DataError as e:
        raise type(e)(f'evaluator {spec.name} (evals.{spec.name}.data) reads labelled images: '
                      f'{e}') from None
      if not getattr(source, 'labelled', True):
        raise sources.BadDataError(
            f'evaluator {spec.name} reads {d.name} split {split!r} under {d.dir!r}, which has '
            'no labels (a .npy file, an .npz without "labels", a TFDS set without '
            f'data.label_key): give evals.{spec.name}.data a labelled set')
      channels = sources.image_channels(source)
      if channels != d.channels:
        raise sources.BadDataError(
            f'evaluator {spec.name} reads {d.name} split {split!r} under {d.dir!r}: '
            + ('no records' if channels is None else
               f'images of {channels} channel(s), the model takes {d.channels}'))
      out[key, split] = source
  return out


def cap(config, spec: Spec) -> int:
  """Images per split the evaluator sees (0: all)."""
  return spec.max_examples or config_schema.resolve(config).eval.max_examples


def programs(spec: Spec, train, test, num_classes: int, *, mesh, probe=None) -> list:
  """[(name, jitted fn, abstract args)] of one evaluator, for `plan`'s ahead-of-time compile
  (probe: the online probe's abstract parameters, for an online_probe evaluator)."""
  module = {'linear_probe': linear_probe, 'knn': knn, 'fewshot': fewshot,
            'online_probe': online_probe}[spec.type]
  extra = {'probe': probe} if spec.type == 'online_probe' else {}
  jobs = module.programs(train, test, num_classes, mesh=mesh, **spec.options, **extra)
  if spec.name == spec.type:
    return jobs
  return [(f'{spec.name}:{name}', fn, args) for name, fn, args in jobs]


def due(all_specs, step: int) -> list[Spec]:
  """The evaluators whose `every` divides this (intermediate) training step."""
  return [s for s in all_specs if s.every and step % s.every == 0]


class Runner:
  """Extracts frozen features of the train and test splits and runs evaluators on them.

  The sources are opened once; features are extracted afresh for every call (the
  encoder changes between calls during training) and shared by the evaluators of one
  call that have the same cap.
  """

  def __init__(self, config, programs, *, train_source=None, test_source=None, eval_sources=None):
    self.config, self.programs = config, programs
    d = config.data
    main = {d.train_split: train_source or sources.get_source(d, d.train_split),
            d.test_split: test_source or sources.get_source(d, d.test_split)}
    self._sources = eval_sources or open_sources(config, main)

  def capped(self, split: str, cap: int, data: str = ''):
    """The records of `split` (of the data `data`, see data_key) the evaluators see: all
    (cap 0), or `cap` of them drawn with config.seed (`sources.sample`), the same on every
    process and at every call."""
    source = self._sources[data, split]
    return sources.sample(source, cap, seed=self.config.seed) if cap else source

  def features(self, variables, cap: int, should_stop=None, kinds: tuple | None = None,
               test_only: bool = False, spec: Spec | None = None):
    """(train, test) Features of `cap` images of each split (0: all), see `capped`, of the
    data `spec` reads (default: config.data): the kinds given concatenated (default:
    Programs.features, i.e. eval.features). test_only: the training split is skipped (None)."""
    e = self.config.eval
    d = data_of(self.config, spec) if spec else config_schema.resolve(self.config.data, 'data')
    key = data_key(spec) if spec else ''
    program = self.programs.features_of(tuple(kinds)) if kinds else self.programs.features
    feed = sharding_lib.batch_feed(self.programs.mesh)
    out = [None] if test_only else []
    for split in (d.test_split,) if test_only else (d.train_split, d.test_split):
      source = self.capped(split, cap, key)
      logging.info('extracting features: %s%s (%d images)', split,
                   f' of {d.name} {d.dir}' if key else '', len(source))
      batches = pipeline.eval_batches(source, d, local_batch_size=e.batch_size // feed.count,
                                      process_index=feed.index, process_count=feed.count)
      out.append(features_lib.extract(program, variables, batches,
                                      self.programs.mesh,
                                      num_batches=-(-len(source) // e.batch_size),
                                      should_stop=should_stop))
    return tuple(out)

  def __call__(self, variables, run_specs, should_stop=None) -> dict:
    """{'eval/NAME_KEY': value} of every evaluator in run_specs.

    should_stop (optional; `preemption.Watcher.poll` during training) is called before every
    feature batch and every evaluator, on every process alike; when it returns True the
    evaluation is abandoned with `preemption.NoticeDuringEvaluation`.
    """
    results, cached = {}, {}
    mesh = self.programs.mesh
    dims = models.feature_dims(self.programs.model)
    # Grouped by data and cap (stable: config order within a group): one extraction per group,
    # of every kind of features it reads, concatenated; each evaluator gets its columns.
    group_of = lambda s: (data_key(s), cap(self.config, s))
    for spec in sorted(run_specs, key=group_of):
      n = group_of(spec)
      if n not in cached:
        group = [s for s in run_specs if group_of(s) == n]
        kinds = feature_kinds(self.config, group)
        test_only = all(s.type in TEST_ONLY for s in group)
        cached = {n: (kinds, self.features(variables, n[1], should_stop, kinds,   # one alive
                                           test_only=test_only, spec=spec))}
      kinds, (train, test) = cached[n]
      num_classes = data_of(self.config, spec).num_classes
      kind = feature_kind(self.config, spec)
      start = sum(dims[k] for k in kinds[:kinds.index(kind)])
      if len(kinds) > 1:
        train, test = (f if f is None else features_lib.columns(f, start, start + dims[kind])
                       for f in (train, test))
      prefix = metric_prefix(self.config, spec)
      extra = {'probe': variables['params']['probe']} if spec.type == 'online_probe' else {}
      if should_stop is not None and should_stop():
        raise preemption.NoticeDuringEvaluation(f'before evaluator {spec.name}')
      evaluate = TYPES[spec.type][0]
      t = time.perf_counter()
      out = evaluate(train, test, num_classes, mesh=mesh, seed=self.config.seed, **spec.options,
                     **extra)
      for key, value in out.items():
        key = key[len(spec.type) + 1:] if key.startswith(spec.type + '_') else key
        results[f'{prefix}{spec.name}_{key}'] = float(value)
      logging.info('evaluator %s (%s) done in %.0fs', spec.name, spec.type,
                   time.perf_counter() - t)
    return results
