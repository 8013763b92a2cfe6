"""XLA:CPU profile arithmetic, no flags: a trace's time per instruction and kind, and the
compiled HLO's matrix products with their shapes and FLOPs (bench/profile_step.py)."""

import collections
import math
import re

_SUFFIX = re.compile(r'\.\d+$')
_COMPUTATION = re.compile(r'^(?:ENTRY )?%(\S+) \((.*?)\) -> [^\n]*?\{\n(.*?)\n\}', re.M | re.S)
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%(\S+) = (\S+?)(?:\{[\d,]*\})? (\w[\w-]*)\((.*?)\)'
                          r'(.*)$', re.M)
_SHAPE = re.compile(r'\w+\[([\d,]*)\]')
# Events that are not XLA instructions: the executor, thread pool and Python frames.
_NOT_THUNKS = ('$', 'ThunkExecutor', 'SlinkyThreadPool', 'PjitFunction',
               'CommonPjRtLoadedExecutable')


def thunk_ms(profile, steps: int) -> tuple:
  """(milliseconds, runs) per step of each XLA instruction in a `jax.profiler.ProfileData`
  of `steps` steps, by the instruction's name (an instruction in a loop runs many times)."""
  ms, runs = collections.Counter(), collections.Counter()
  for plane in profile.planes:
    for line in plane.lines:
      for event in line.events:
        if not event.name.startswith(_NOT_THUNKS):
          ms[event.name] += event.duration_ns / 1e6 / steps
          runs[event.name] += 1 / steps
  return ms, runs


def by_kind(times: collections.Counter) -> collections.Counter:
  """Times summed over instructions of one kind (`ynn_fusion.12` -> `ynn_fusion`)."""
  out = collections.Counter()
  for name, ms in times.items():
    out[_SUFFIX.sub('', name)] += ms
  return out


def _dims(shape: str) -> list:
  m = _SHAPE.match(shape)
  return [int(d) for d in m.group(1).split(',') if d] if m else []


def _contracting(attrs: str) -> list:
  m = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', attrs)
  return [int(d) for d in m.group(1).split(',') if d] if m else []


def products(hlo: str) -> dict:
  """{instruction name: product} for every dot of the compiled HLO, and every fusion that
  calls a computation with one: output and operand shapes, contracting size K, FLOPs
  (2 x output elements x K), and the jax op_name."""
  # Dots by instruction; a computation's (first) dot; the computation a fusion calls.
  dots, dot_of, fusions = {}, {}, {}
  for comp, params, body in _COMPUTATION.findall(hlo):
    shapes = dict(re.findall(r'(\S+): (\w+\[[\d,]*\])', params))
    for name, shape, op, args, attrs in _INSTRUCTION.findall(body):
      shapes[name] = shape
      if op == 'dot':
        operands = [a.strip().lstrip('%') for a in args.split(',')]
        lhs = _dims(shapes.get(operands[0], ''))
        k = math.prod(lhs[i] for i in _contracting(attrs) if i < len(lhs))
        op_name = re.search(r'op_name="([^"]*)"', attrs)
        dots[name] = {'out': shape, 'in': [shapes.get(o, '?') for o in operands], 'k': k,
                      'flops': 2 * math.prod(_dims(shape)) * k,
                      'op': op_name.group(1) if op_name else ''}
        dot_of.setdefault(comp, dots[name])
      elif op == 'fusion':
        called = re.search(r'calls=%(\S+?)[,\s]', attrs + ' ')
        if called:
          fusions[name] = called.group(1)
  return {**dots, **{name: dot_of[comp] for name, comp in fusions.items() if comp in dot_of}}


def tables(times: collections.Counter, runs: collections.Counter, prods: dict,
           top: int) -> str:
  """Markdown: time by kind, then the `top` products by time with their FLOP/s."""
  total = sum(times.values())
  kinds = by_kind(times)
  lines = [f'XLA instructions: {total:,.0f} ms per step (summed over threads\' events; '
           'nested loops count their body)', '', '| kind | ms/step | share |', '|---|---|---|']
  lines += [f'| `{k}` | {ms:,.1f} | {ms / total:.0%} |' for k, ms in kinds.most_common(12)]
  timed = sorted(((times[n], n, {**p, 'flops': p['flops'] * runs[n]})
                  for n, p in prods.items() if times.get(n)), reverse=True)
  prod_ms = sum(ms for ms, _, _ in timed)
  prod_flops = sum(p['flops'] for _, _, p in timed)
  lines += ['', f'Products: {prod_ms:,.0f} ms per step ({prod_ms / total:.0%}), '
            f'{prod_flops / 1e9:,.1f} GFLOP per step, '
            f'{prod_flops / prod_ms / 1e6:,.0f} GFLOP/s on average', '',
            '| ms/step | GFLOP/s | output | operands | K | from |', '|---|---|---|---|---|---|']
  for ms, _, p in timed[:top]:
    op = re.sub(r'^jit\([^)]*\)/', '', p['op']).replace('/dot_general', '')
    lines.append(f"| {ms:.1f} | {p['flops'] / ms / 1e6:,.0f} | {p['out']} | "
                 f"{' x '.join(p['in'])} | {p['k']} | `{op[-60:]}` |")
  return '\n'.join(lines)
