"""Every test sees 8 fake CPU devices, so sharded code paths run on every run."""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update('jax_num_cpu_devices', 8)
