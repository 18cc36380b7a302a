"""PIRL pretraining and fine-tuning: `python main.py --config=configs/pirl.py` (see pirl_jax/commands/cli.py).

Installed with `pip install -e .`, the same command is `pirl-jax --config=configs/pirl.py`.
"""

import sys

from pirl_jax.commands import cli

if __name__ == "__main__":
  sys.exit(cli.main())
