"""Test setup: 8 fake CPU devices, so multi-device equals single-device can be checked in-process.

XLA reads the flag when jax initialises its backend, so it is set before any test imports jax.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
