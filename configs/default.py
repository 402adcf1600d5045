"""The one default config: ISBI 2015 cephalometric, reference-code defaults (REFERENCE.md "Decisions").

Its settings are in the package (cc2dv2_jax/config_lib.py `get_config`), where every config file
and tool starts from them; this file makes them a config of their own
(`--config=configs/default.py`) and is the smallest one to copy.
"""
from cc2dv2_jax import config_lib


def get_config():
  return config_lib.get_config()
