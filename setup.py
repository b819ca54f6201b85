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
        'orbax-checkpoint>=0.12,<0.13',
        'grain>=0.2.12,<0.3',
        'ml-collections>=1.0',
        'absl-py',
        'numpy',
        'tensorboardX>=2.6',
        'tensorflow-datasets>=4.9.8',
        'pillow',
        'scipy>=1.11',        # Spearman correlation (select), normal quantiles (plots)
        'matplotlib>=3.7',    # PNG plots written into the workdir
        'safetensors>=0.4',   # exported encoder weights
    ],
    extras_require={
        'test': ['pytest>=8', 'pytest-xdist>=3.5', 'chex>=0.1.90', 'portpicker'],
        # benchmarks/sigreg.py compares against the reference algorithm in PyTorch.
        'bench': ['torch==2.13.0'],
        # tests/test_timm.py holds our ViT against timm's, the authors' ViT library. timm
        # imports torchvision, and only a matching torch/torchvision pair imports together
        # (PyPI's builds; about 5.5 GB with CUDA libraries, run on the CPU here).
        'reference': ['torch==2.14.1', 'torchvision==0.29.1', 'timm==1.0.31'],
        # python -m lejepa_jax.plan compiles for TPU slices with libtpu's compile-only devices
        # (no TPU needed); gcsfs lets etils.epath reach gs:// without TensorFlow;
        # google-cloud-storage lets tensorboardX write event files to gs://.
        'tpu': ['jax[tpu]>=0.8,<0.11', 'gcsfs', 'google-cloud-storage'],
        # python -m lejepa_jax.plan --topology=h100-8 compiles for GPUs without a GPU (the
        # CUDA PJRT plugin and NVIDIA's libraries, about 5.5 GB); GPU training needs it too.
        'gpu': ['jax[cuda12]>=0.8,<0.11'],
    },
)
