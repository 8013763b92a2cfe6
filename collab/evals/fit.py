"""The 'fit' evaluator: how well a model fits each participant's own training data.

Its section is the x axis of memorization against fit (analysis/matched.py): the mean
token loss of the model on every participant's training blocks (at most
config.eval.fit.max_blocks of them, the seeded choice k-extractability makes), and pooled.
"""

from collab.evals import interface


def compute(ctx) -> dict:
  """{'participants': {p: {'train_loss', 'tokens'}}, 'pooled': {...}} of one model."""
  from collab.data import blocks as blocks_lib
  from collab.evals import perplexity  # jax: only where a model is scored.
  from collab.evals.memorization import extractability  # Its seeded block choice.
  from collab.model import GPT2
  cap, train = int(ctx.config.eval.fit.get('max_blocks', 0)), {}
  for p in ctx.names:
    blocks = blocks_lib.load_blocks(ctx.data_dir, p, 'train')
    if len(blocks):  # At most `cap` of them (0: all), the same ones for every model.
      train[p] = blocks[extractability.choose_blocks(len(blocks), cap, int(ctx.config.seed),
                                                     p, 'train')]
  out = perplexity.evaluate(ctx.params, GPT2(ctx.model_config), train,
                            int(ctx.config.train.eval_batch_size), progress=False)
  loss = lambda r: r['loss_sum'] / r['tokens'] if r['tokens'] else None
  return {'participants': {p: {'train_loss': loss(out[p]), 'tokens': out[p]['tokens']}
                           for p in train},
          'pooled': {'train_loss': loss(out[perplexity.POOLED]),
                     'tokens': out[perplexity.POOLED]['tokens']}}


EVALUATOR = interface.Evaluator(
    name='fit', needs=frozenset({'model', 'data'}),
    enabled=lambda config: bool(config.eval.get('fit', {}).get('enabled', True)),
    settings=lambda config: [int(config.train.eval_batch_size),
                             config.eval.fit.get('max_blocks', 0)], compute=compute)
