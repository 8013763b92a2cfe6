"""collab.io: what the writers leave and what they import."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_metrics_writer_logs_to_tensorboard_without_importing_torch(tmp_path):
  """tensorboardX would import torch (seconds per training process) where it is installed;
  torch stays importable afterwards."""
  code = ('import importlib.util, sys\n'
          'from collab import io\n'
          f'w = io.MetricsWriter({str(tmp_path)!r})\n'
          'w.write(1, {"train/loss": 2.5})\n'
          'w.close()\n'
          'assert "torch" not in sys.modules, "torch was imported"\n'
          'if importlib.util.find_spec("torch") is not None:\n'
          '  import torch  # Still importable: the guard is gone.\n'
          '  assert torch.ones(1).item() == 1.0\n')
  subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True, timeout=300)
  assert (tmp_path / 'metrics.jsonl').read_text().strip() == '{"step": 1, "train/loss": 2.5}'
  assert any(name.startswith('events.out') for name in os.listdir(tmp_path / 'tensorboard'))
