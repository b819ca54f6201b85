"""Several JAX processes of one command on this machine, talking through gloo (as the hosts of
a pod or a GPU cluster do), for the multi-host tests."""
import os
import subprocess
import sys

import portpicker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env() -> dict:
  """This environment (with conftest's persistent compilation cache: a rerun loads what its
  first run compiled, as a real rerun would) without the 8 fake devices of this process."""
  out = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  out['PYTHONPATH'] = ROOT
  return out


def run(module: str, flags, processes: int, devices_per_process: int,
        timeout: int = 600) -> list[tuple[str, int]]:
  """(output, exit status) of each process of `python -m MODULE FLAGS`, each with
  devices_per_process simulated CPU devices (one process: no coordinator)."""
  base = [sys.executable, '-m', module, f'--cpu_devices={devices_per_process}', *flags]
  if processes > 1:
    port = portpicker.pick_unused_port()
    commands = [base + [f'--coordinator_address=localhost:{port}',
                        f'--num_processes={processes}', f'--process_id={i}']
                for i in range(processes)]
  else:
    commands = [base]
  procs = [subprocess.Popen(c, cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for c in commands]
  return [(p.communicate(timeout=timeout)[0], p.returncode) for p in procs]
