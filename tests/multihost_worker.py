"""One process of tests/test_multihost.py: a stage through cli.main under jax.distributed.

Run as `python -m tests.multihost_worker PORT PROCESS_ID NUM_PROCESSES WORKDIR STAGE OVERRIDES_JSON`
from the repository root, with JAX_PLATFORMS and XLA_FLAGS set by the parent (before jax loads).
"""
import faulthandler
import json
import signal
import sys


def main(argv):
  faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints where a hung process waits
  port, process_id, num_processes, workdir, stage, overrides = argv[1:7]
  from absl import flags
  flags.FLAGS.mark_as_parsed()  # grain reads absl flags
  from tests.helpers import tiny_config
  config = tiny_config(**json.loads(overrides))
  config.distributed.coordinator = f"127.0.0.1:{port}"
  config.distributed.num_processes = int(num_processes)
  config.distributed.process_id = int(process_id)
  config.distributed.initialization_timeout = 60
  from cc2dv2_jax import cli
  return cli.main(config, workdir, stage)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
