"""The packages: pirl_jax, and the repository's configs/ shipped inside it as pirl_jax.configs,
so that an installed `pirl-jax` finds --config=configs/pirl.py (or --config=pirl:tiny) from any
folder (pirl_jax/commands/program.py). Everything else is in pyproject.toml."""

import setuptools

setuptools.setup(
    packages=setuptools.find_packages(include=["pirl_jax", "pirl_jax.*"]) + ["pirl_jax.configs"],
    package_dir={"pirl_jax.configs": "configs"},
)
