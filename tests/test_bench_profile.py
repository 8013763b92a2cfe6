"""bench/hlo_profile.py: products found in compiled HLO with their FLOPs, times by kind."""

import collections

import jax
import jax.numpy as jnp

from bench import hlo_profile


def test_products_of_compiled_hlo_have_shapes_and_flops():
  def f(a_MxK, b_KxN, c_BxMxK, d_BxKxN):
    return jnp.tanh(a_MxK @ b_KxN), jnp.einsum('bmk,bkn->bmn', c_BxMxK, d_BxKxN)

  args = (jnp.ones((64, 48)), jnp.ones((48, 32)), jnp.ones((3, 8, 5)), jnp.ones((3, 5, 7)))
  hlo = jax.jit(f).lower(*args).compile().as_text()
  found = sorted((p['flops'], p['k']) for p in hlo_profile.products(hlo).values())
  # Each product once (a fusion and the dot it calls name the same product).
  assert sorted(set(found)) == [(2 * 3 * 8 * 7 * 5, 5), (2 * 64 * 32 * 48, 48)]


def test_thunk_kinds_sum_numbered_instructions():
  times = collections.Counter({'ynn_fusion': 1.0, 'ynn_fusion.12': 2.5, 'dot.3': 4.0})
  assert hlo_profile.by_kind(times) == {'ynn_fusion': 3.5, 'dot': 4.0}


def test_thunk_times_per_step_count_loop_runs_and_skip_the_executor():
  event = lambda name, ns: type('E', (), {'name': name, 'duration_ns': ns})
  line = type('L', (), {'events': [event('ynn_fusion.2', 4e6), event('ynn_fusion.2', 2e6),
                                   event('ThunkExecutor::Execute', 9e6),
                                   event('$api.py:1 block_until_ready', 9e6)]})
  profile = type('P', (), {'planes': [type('Plane', (), {'lines': [line]})]})
  ms, runs = hlo_profile.thunk_ms(profile, steps=2)
  assert ms == {'ynn_fusion.2': 3.0} and runs == {'ynn_fusion.2': 1.0}
