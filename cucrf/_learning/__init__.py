"""The parts of :func:`cucrf.fit`, each readable on its own.

* :mod:`.data`: training and validation samples, read lazily and checked once up front;
  minibatches of equal-size images.
* :mod:`.objective`: the training loss (cross-entropy at a learned output temperature), its
  gradient, and the prior that keeps the parameters near their start.
* :mod:`.parameters`: CRF parameters as a dict of float64 arrays (the optimiser's view) and back.
* :mod:`.selection`: the validation score of every epoch and the choice of the returned epoch.
* :mod:`.checkpoint`: atomic checkpoints, their checks, and resuming.
* :mod:`.trainer`: one optimiser step, one epoch, evaluation; :func:`cucrf.fit` drives it.
"""
