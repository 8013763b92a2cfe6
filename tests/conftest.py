"""Test setup: 4 virtual CPU devices (before jax is imported) and shared fixtures."""

import os


def _flag_name(flag: str) -> str:
  return flag.split('=', 1)[0]


def xla_flags(*flags: str) -> str:
  """XLA_FLAGS for a subprocess: this process's (so what the user set, such as
  --xla_cpu_max_isa, passes through) with `flags` set, each replacing its namesake."""
  names = {_flag_name(f) for f in flags}
  kept = [f for f in os.environ.get('XLA_FLAGS', '').split() if _flag_name(f) not in names]
  return ' '.join(kept + list(flags))


def _with_defaults(user: str, *defaults: str) -> str:
  """The user's XLA_FLAGS plus each default flag the user did not set already."""
  names = {_flag_name(f) for f in user.split()}
  return ' '.join(user.split() + [f for f in defaults if _flag_name(f) not in names])


# Appended to the user's XLA_FLAGS (`XLA_FLAGS=--xla_cpu_max_isa=AVX2 make test` keeps
# them), never overriding a flag the user set. A loaded 2-core machine can starve 4
# virtual devices past XLA's 40 s collective rendezvous limit, which aborts the process;
# wait longer instead. The suite's programs are tiny and each runs a few times, so
# compiling them dominates its time: LLVM at -O0 compiles them ~20% faster (the
# optimization level changes no arithmetic XLA asks for; the suite passes at either
# level, and `XLA_FLAGS=--xla_backend_optimization_level=3 make test` runs it at XLA's
# default). Launchers and the study keep XLA's default.
os.environ['XLA_FLAGS'] = _with_defaults(
    os.environ.get('XLA_FLAGS', ''), '--xla_force_host_platform_device_count=4',
    '--xla_cpu_collective_call_terminate_timeout_seconds=600',
    '--xla_backend_optimization_level=0')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
# Tests compile the same small programs again and again: reuse them across tests.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', '/tmp/collab-tests-jax-cache')


import pytest  # noqa: E402  (after the environment above is set)

TINY_PARTICIPANTS = ('alpha', 'beta', 'gamma')


def write_tiny_corpus(root: str, org: str, files: int = 40) -> str:
  """A dir: source of small Python files, distinct per organization, in 4 repositories."""
  for i in range(files):
    path = os.path.join(root, org, f'{org}_repo{i % 4}', f'mod{i}.py')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
      f.write(
          f'def {org}_compute_{i}(left, right):\n'
          f'    """Combines {org} values number {i}."""\n'
          f'    total = left + right * {i}\n'
          f'    for step in range({i % 5 + 2}):\n'
          f'        total = total - step * {i % 3}\n'
          f'    result = total == {i * 7}\n'
          f'    return result\n\n\n'
          f'class {org.title()}Thing{i}:\n'
          f'    size = {i}\n'
          f'    name = "{org}_{i}"\n')
  return os.path.join(root, org)


def tiny_data_config(root: str, names=TINY_PARTICIPANTS, seq_len: int = 32):
  from configs import common
  participants = [common.participant(n, (f'dir:{write_tiny_corpus(root, n)}',))
                  for n in names]
  c = common.data_config(participants, seq_len=seq_len)
  c.tokenizer.vocab_size = 300
  return c


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory) -> str:
  """A built data folder: three tiny participants, 300-token BPE, 32-token blocks."""
  from collab.data import build
  root = str(tmp_path_factory.mktemp('tiny_corpora'))
  data_dir = os.path.join(str(tmp_path_factory.mktemp('tiny_data')), 'data')
  build.build_data(tiny_data_config(root), data_dir, progress=False)
  return data_dir


def tiny_run_config(data_dir: str, **train):
  """A run config for the tiny data: 2-layer d=32 GPT-2, AdamW, a dozen steps."""
  from configs import common
  c = common.base_config('tiny')
  c.model.num_layers, c.model.num_heads, c.model.d_model = 2, 2, 32
  c.model.d_ff, c.model.max_len, c.model.dropout = 64, 32, 0.0
  # The data is built already: a run reads only the participants' names from here.
  c.data = common.data_config([common.participant(n, ('dir:built',)) for n in TINY_PARTICIPANTS],
                              seq_len=32)
  c.data.tokenizer.vocab_size = 300
  c.data.data_dir = data_dir
  c.train.batch_size, c.train.steps, c.train.warmup_steps = 8, 12, 2
  c.train.learning_rate, c.train.log_every, c.train.checkpoint_every = 3e-3, 4, 4
  c.train.eval_batch_size = 16
  for k, v in train.items():
    setattr(c.train, k, v)
  return c



# The order pytest-xdist hands files out in (make test passes --no-loadscope-reorder):
# Flower's tests first, since Flower's own waits (its SuperNodes poll every 3 s, a killed
# one is noticed after 30-60 s) leave their worker mostly idle while the other runs the
# CPU-bound files; then the rest by number of tests, largest first (xdist's own order).
FIRST = ('test_flower.py',)


def pytest_collection_modifyitems(items):
  counts = {}
  for item in items:
    counts[item.path.name] = counts.get(item.path.name, 0) + 1
  order = {id(item): i for i, item in enumerate(items)}
  items.sort(key=lambda item: (item.path.name not in FIRST, -counts[item.path.name],
                               item.path.name, order[id(item)]))
