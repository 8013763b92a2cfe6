r"""Starts this organization's Flower SuperNode (the `flower` extra) and serves until stopped.

  python -m launch.flower_node --org=psf --data_dir=DIR --state_dir=DIR \
      --superlink=SUPERLINK_HOST:8000 --root_certificates=ca.crt \
      --auth_private_key=psf_key [--config=configs/default.py]

DIR (--data_dir) is a data folder built with launch.build_data holding this organization's
participant only; it never leaves the machine: the node sends the server its numbers of
training blocks, and each round the trained parameters and loss sums. --state_dir keeps
the node's optimizer state between rounds, its worker and its compilation cache. With
--config the node refuses a server whose config trains otherwise (the config both sides
agreed on). Without --root_certificates the connection is insecure (localhost only).
"""

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from launch import common

_CONFIG = config_flags.DEFINE_config_file('config', None, 'The agreed experiment config '
                                          '(optional): a server with another is refused.',
                                          lock_config=True)
_ORG = flags.DEFINE_string('org', None, 'The participant this node trains for.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'This participant\'s built data folder.')
_STATE_DIR = flags.DEFINE_string('state_dir', None, 'Where the node keeps its state.')
_SUPERLINK = flags.DEFINE_string('superlink', '127.0.0.1:8000', 'The SuperLink\'s address.')
_ROOT_CERTIFICATES = flags.DEFINE_string(
    'root_certificates', '', 'CA certificate (PEM) of the SuperLink; empty: insecure.')
_AUTH_KEY = flags.DEFINE_string('auth_private_key', '', 'This SuperNode\'s private key '
                                '(SuperNode authentication; its public key registered with '
                                '`flwr supernode register`).')
_PORT = flags.DEFINE_integer('port', 9094, 'Local port of the SuperNode\'s ClientApp API.')
flags.mark_flags_as_required(['org', 'data_dir', 'state_dir'])


def command() -> list:
  """flower-supernode's argv for these flags (after checking the data folder)."""
  from collab.flower import node as node_lib  # pylint: disable=g-import-not-at-top
  from collab.settings import run  # pylint: disable=g-import-not-at-top
  node = node_lib.Node(_ORG.value, os.path.abspath(_DATA_DIR.value),
                       os.path.abspath(_STATE_DIR.value))
  problems = node_lib._data_problems(node)  # pylint: disable=protected-access
  if problems:
    raise ValueError(f'--data_dir: {problems[0]}')
  os.makedirs(node.state_dir, exist_ok=True)
  if _CONFIG.value is not None:
    run.write_config(node.state_dir, _CONFIG.value)
  tls = (['--root-certificates', _ROOT_CERTIFICATES.value] if _ROOT_CERTIFICATES.value
         else ['--insecure'])
  auth = ['--auth-supernode-private-key', _AUTH_KEY.value] if _AUTH_KEY.value else []
  return [os.path.join(os.path.dirname(sys.executable), 'flower-supernode'), *tls, *auth,
          '--superlink', _SUPERLINK.value, '--host', '127.0.0.1', '--port', str(_PORT.value),
          '--node-config', f'org="{node.org}" data-path="{node.data_dir}" '
          f'state-path="{node.state_dir}"']


def main(argv):
  del argv
  argv = common.run_or_exit('launch.flower_node', command)
  os.execv(argv[0], argv)


if __name__ == '__main__':
  app.run(main, flags_parser=common.parse_flags('launch.flower_node'))
