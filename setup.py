"""cc2dv2_jax: CC2Dv2 one-shot landmark detection in JAX/Flax."""
import pathlib

from setuptools import find_packages
from setuptools import setup

here = pathlib.Path(__file__).parent
requirements = [l.strip() for l in (here / "requirements.txt").read_text().splitlines()
                if l.strip() and not l.startswith("#")]

setup(
    name="cc2dv2_jax",
    version="0.1.0",
    description="One-shot anatomical landmark detection with a relative distance bias (CC2Dv2) in JAX",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # The package, and configs/ inside it as cc2dv2_jax.configs: the console script's default
    # config (configs/demo.py) must exist wherever the package is installed. launch/ and
    # data_prep/ are run from a checkout (`python -m launch.ablate`).
    packages=find_packages(include=["cc2dv2_jax", "cc2dv2_jax.*"]) + ["cc2dv2_jax.configs"],
    package_dir={"cc2dv2_jax.configs": "configs"},
    install_requires=requirements,
    extras_require={
        "cuda12": ["jax[cuda12]>=0.10.2,<0.13"],
        "cuda13": ["jax[cuda13]>=0.10.2,<0.13"],
        "dicom": ["pydicom>=2.4,<4"],
        "wandb": ["wandb>=0.17"],
        # torch only for the weight converter and the parity tools; pinned so pip does not pull a
        # multi-GB CUDA build on CPU machines.
        "torch": ["torch==2.13.0"],
        "test": ["pytest>=8", "pytest-xdist>=3.6", "pydicom>=2.4,<4", "torch==2.13.0", "pyyaml>=6"],
    },
    entry_points={"console_scripts": ["cc2dv2=cc2dv2_jax.main:app_main"]},
)
