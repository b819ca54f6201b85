from setuptools import find_packages, setup

setup(
    name='lejepa_jax',
    version='0.1.0',
    description='LeJEPA (SIGReg self-supervised learning) in JAX/Flax, from a CPU to a TPU pod',
    packages=find_packages(include=['lejepa_jax', 'lejepa_jax.*']),
    python_requires='>=3.10',
    install_requires=[
        'jax>=0.8,<0.11',
        'flax>=0.11,<0.13',
        'optax>=0.2.5',
        'orbax-checkpoint>=0.11,<0.13',
        'grain>=0.2.12,<0.3',
        'ml-collections>=1.0',
        'absl-py',
        'numpy',
        'tensorboardX>=2.6',
        'tensorflow-datasets>=4.9.8',
        'pillow',
    ],
    extras_require={
        'test': ['pytest>=8', 'chex>=0.1.90', 'scipy>=1.11', 'portpicker'],
        # benchmarks/sigreg.py compares against the reference algorithm in PyTorch.
        'bench': ['torch==2.13.0'],
    },
)
