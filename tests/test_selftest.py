"""`python -m lejepa_jax.selftest`: every row passes on simulated devices (one process with 8
devices, and two gloo processes with 2 each, the multi-host paths), and every row fails, saying
what differs, when its check is fed the input it exists to catch."""
import json
import os
import re

import jax
import jax.numpy as jnp
import pytest

import gloo_processes   # tests/gloo_processes.py

from configs import fmnist
from lejepa_jax import config as config_lib
from lejepa_jax import selftest
from lejepa_jax import sharding as sharding_lib
from lejepa_jax.selftest import checks


pytestmark = pytest.mark.skipif(
    not os.path.exists('/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz'),
    reason='needs the dataset-fashion-mnist Debian package')


def _selftest(workdir, processes, devices, *flags):
  return gloo_processes.run('lejepa_jax.selftest', ['--config=configs/vitg.py:runlocal',
                                                    f'--workdir={workdir}', *flags],
                            processes, devices)


def _report(output):
  line = next(l for l in output.splitlines() if l.startswith('{"selftest"'))
  return json.loads(line)


@pytest.mark.parametrize('processes,devices', [(1, 8), (2, 2)])
def test_every_row_passes_on_simulated_devices(tmp_path, processes, devices):
  results = _selftest(tmp_path / 'run', processes, devices)
  output, code = results[0]
  assert all(c == 0 for _, c in results), [o[-3000:] for o, _ in results]
  report = _report(output)
  assert report['passed'] and list(report['selftest']) == list(selftest.CHECKS)
  assert all(r['result'] == 'pass' for r in report['selftest'].values()), report
  assert '| sigreg_sharded_equals_single_device | pass |' in output
  if processes > 1:   # the other host checked the same rows and printed nothing
    assert '"selftest"' not in results[1][0]
    assert report['selftest']['host_rows_are_the_promised_global_positions']['hosts'] == 2
  # the checkpoint it wrote is gone, nothing else was left in the workdir
  assert not (tmp_path / 'run' / 'selftest').exists()


def test_a_broken_row_fails_the_command_and_says_what_differs(tmp_path):
  output, code = _selftest(tmp_path / 'run', 1, 8, '--break=checkpoint_restores_bitwise')[0]
  assert code == 1, output[-3000:]
  report = _report(output)
  assert not report['passed']
  assert report['selftest']['checkpoint_restores_bitwise']['result'] == 'FAIL'
  assert re.search(r'checkpoint_restores_bitwise \| FAIL \| .*1 differ: \.step', output), output


# Each check alone, broken on purpose, in this process (8 devices).
@pytest.fixture(scope='module')
def prepared():
  c = fmnist.get_config('runlocal')
  c.model.depth = 1
  return config_lib.prepare(c)


def test_sigreg_row_sees_a_per_device_statistic(prepared):
  good = checks.sigreg_across_devices(prepared.config, prepared.mesh)
  bad = checks.sigreg_across_devices(prepared.config, prepared.mesh, broken=True)
  assert good.ok and good.figures['value_rel'] < 1e-5 and good.figures['devices'] == 8
  assert bad.ok is False and bad.figures['value_rel'] > 1e-3
  assert 'sharded' in bad.detail and 'single-device' in bad.detail


def test_replay_row_sees_a_wrong_batch(prepared):
  bad = checks.replay_on_smaller_mesh(prepared.config, prepared.mesh, num_steps=2, depth=1,
                                      broken=True)
  assert bad.ok is False and 'step 2' in bad.detail, bad.detail
  one = sharding_lib.make_mesh({'data': 1}, devices=jax.devices()[:1])
  assert checks.replay_on_smaller_mesh(prepared.config, one).ok is None   # nothing smaller


def test_host_rows_row_sees_hosts_reading_the_same_block(prepared):
  source = prepared.train_source
  good = checks.host_rows(prepared.config, source)
  bad = checks.host_rows(prepared.config, source, broken=True)
  assert good.ok and good.figures['rows_checked'] == 8
  assert bad.ok is False
  assert 'host 1 batch 0: rows differ from global positions 2..3' in bad.detail
  assert 'rows drawn by more than one host' in bad.detail


def test_feed_rate_row_sees_a_slow_pipeline(prepared):
  source = prepared.train_source
  # Fashion-MNIST crops: ~2,000 images/s on one core; a 1000x slower feed cannot keep 100
  good = checks.feed_rate(prepared.config, source, step_images_per_s=100.0)
  bad = checks.feed_rate(prepared.config, source, step_images_per_s=100.0, broken=True)
  assert good.ok and good.figures['feed_images_per_s'] > 100.0
  assert bad.ok is False and 'the step would wait for data' in bad.detail


def test_checkpoint_row_sees_a_changed_state(prepared, tmp_path):
  state = prepared.programs.init(jnp.int32(0))
  good = checks.checkpoint_round_trip(prepared.programs, state, tmp_path)
  bad = checks.checkpoint_round_trip(prepared.programs, state, tmp_path, broken=True)
  assert good.ok and 'bitwise equal' in good.detail
  assert bad.ok is False and '.step' in bad.detail
  assert os.listdir(tmp_path) == []


def test_preemption_row_sees_a_notice_that_never_comes():
  good = checks.preemption_notice()
  bad = checks.preemption_notice(max_polls=3, broken=True)
  assert good.ok and good.figures['polls'] == [1]
  assert bad.ok is False and '[0]' in bad.detail


def test_unknown_row_names_are_refused():
  with pytest.raises(ValueError, match='no check named'):
    selftest.run(fmnist.get_config('runlocal'), '/nonexistent', broken=('sigreg',))
