"""Model merging: soups, Fisher averaging, checkpoint averaging, TIES and DARE.

Modules: ``soups`` (the rules, pure math), ``models`` (Fisher, BatchNorm), ``inputs`` (run
directories and files), ``cli`` (the merge by method name and ``python -m gossip.merge``).

A decentralized run ends with N different models (one per rank or simulated node), and a run
with checkpoints leaves a series of them over time. This module merges them:

- ``uniform``: the mean of the models (a uniform soup, Wortsman et al. 2022, arXiv 2203.05482).
- ``greedy-soup``: Wortsman et al.'s greedy soup. The models are sorted by held-out score, best
  first; each is added to the soup if the soup's held-out score does not drop. The result never
  scores below the best single model on the held-out set.
- ``fisher``: Fisher-weighted averaging (Matena & Raffel 2022, arXiv 2111.09832),
  ``theta = sum_i F_i theta_i / sum_i F_i`` per coordinate, with F_i the diagonal Fisher of model
  i estimated on held-out inputs: for classification the exact expectation over the model's own
  predictive distribution, ``E_x sum_c p(c|x) (d log p(c|x) / d theta)^2``; for other tasks with
  labels sampled from the model (seeded).
- ``last-k``: the mean of the last k checkpoints of one rank.
- ``ema``: exponential moving average of the checkpoints, oldest first,
  ``e_1 = theta_1, e_t = d e_{t-1} + (1 - d) theta_t``.
- ``lawa``: latest-weight averaging (Kaddour 2022, arXiv 2209.14981; Sanyal et al. 2023,
  arXiv 2306.03241): the mean of the k latest checkpoints taken ``every`` checkpoints apart.
- ``ties``: TIES-merging (Yadav et al. 2023, arXiv 2306.01708) of the task vectors
  ``tau_i = theta_i - base``: trim each to its ``density`` fraction of largest magnitudes (over
  all parameters at once), elect a sign per coordinate (the sign of the summed trimmed values),
  take the mean of the trimmed values that agree with it (disjoint mean), and return
  ``base + scale * merged``.
- ``dare``: DARE (Yu et al. 2024, arXiv 2311.03099): drop each coordinate of each task vector
  with probability ``drop``, rescale the survivors by ``1 / (1 - drop)``, and return
  ``base + scale * mean_i(tau_i)``.

Inputs (:func:`load_models`): a real run's directory (``checkpoints/step_<s>/rank_<r>.pt``, read
with :func:`gossip.checkpoint.load_rank_state`), a simulation's final models (``models.json`` +
``models.pt``, written by ``python -m simulations.run --save-models``, see :func:`save_stacked`),
checkpoint files, or merged models written by this module. Soup methods merge the latest step's
models of every rank (or every node); checkpoint methods merge one rank's checkpoints over time.

BatchNorm: the running statistics of a merged model are not those of its weights. With
``bn_recompute`` (the default when the model has BatchNorm running statistics) they are
recomputed from scratch on ``bn_batches`` training batches (cumulative averages, torch's
``momentum=None``) before any evaluation. Without it (``--no-bn-recompute``) every model keeps
the statistics it was saved with: a simulation's ``models.pt`` and a real run's checkpoints
hold them (a checkpoint written before buffers were saved holds none: its models get the fresh
model's).

The held-out set for greedy soup scores and Fisher estimates is drawn (seeded) from the task's
training split, so the test split stays unseen until the merged model is scored on it.

CLI::

    python -m gossip.merge RUN_DIR_OR_FILES... --method uniform|greedy-soup|fisher|last-k|ema|\\
        lawa|ties|dare --out FILE

prints the ingredients' and the merged model's test metrics; its last line is
``accuracy=VALUE`` (or ``loss=VALUE`` for tasks without accuracy). Bad input exits with 2.
"""


from gossip.merge.cli import METHODS, MergeOptions, MergeResult, main, merge, select
from gossip.merge.inputs import Ingredient, Models, load_models, save_stacked
from gossip.merge.models import diagonal_fisher, recompute_bn, state_of, to_model
from gossip.merge.soups import (
    CHECKPOINT_METHODS,
    SOUP_METHODS,
    average,
    dare,
    dare_masks,
    ema,
    fisher_average,
    greedy_soup,
    last_k,
    lawa,
    ties,
)

__all__ = [
    "CHECKPOINT_METHODS",
    "METHODS",
    "SOUP_METHODS",
    "Ingredient",
    "MergeOptions",
    "MergeResult",
    "Models",
    "average",
    "dare",
    "dare_masks",
    "diagonal_fisher",
    "ema",
    "fisher_average",
    "greedy_soup",
    "last_k",
    "lawa",
    "load_models",
    "main",
    "merge",
    "recompute_bn",
    "save_stacked",
    "select",
    "state_of",
    "ties",
    "to_model",
]
