"""Synthetic HER2 IHC fields with per-cell ground truth: the forward model behind the simulated microscope, the tests
and the accuracy benchmark (``her2scope.synthetic.model``). It is not part of scoring: it draws what the scorer
measures, with the scorer's stain definitions (``her2scope.config.scoring.StainVectors``, ``her2scope.scoring.stains``).
"""

from her2scope.synthetic import model
from her2scope.synthetic.model import *  # noqa: F403 - the package's names are the model's public ones

__all__ = model.__all__
