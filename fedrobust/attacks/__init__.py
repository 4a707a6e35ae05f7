"""Adversarial attacks and robustness measures on any logits model.

This package knows nothing of runs, configs or caches: its only dependency
is ``model``, a callable that maps a batch of inputs in [0, 1] pixel space
to logits (an ``nn.Module`` in eval mode, an ensemble, a lambda). The
evaluation stages (:mod:`fedrobust.evaluation`) and the adversarial-training
strategy (:mod:`strategies.adversarial`) both build on it.

Every attack is a small object built with its budget and called on
``(x, y)``; it returns ``x_adv`` of the same shape, inside the budget's ball
around ``x`` and inside [0, 1], and never mutates its inputs. Randomness
comes from an explicit seed, never from the global RNG.

The worst case, always (:mod:`.worst_case`): an attack that queries the
model it attacks (the white-box attacks and Square) classifies the clean
images first, then returns, per image, the first point it evaluated that
the model misclassified, and falls back to its best-loss or last point only
where there was none; ``attack.run(x, y)`` also says which images it saw
misclassified. ``robust_images(target, attack, x, y, batch_size)`` says,
per image, whether it withstood the attack (clean, answer and every point
seen); ``worst_case_accuracy`` is its share. Pass ``worst_case=False`` to a
gradient attack for its plain last iterate (transfer from surrogates,
adversarial training).

Gradient attacks, L-infinity (:mod:`.gradient`)
    ``FGSM(model, eps, loss)``, ``BIM(model, eps, steps, alpha, loss)``,
    ``PGD(model, eps, steps, alpha, loss, seed)``,
    ``APGD(model, eps, steps, loss, seed, restarts)`` (Auto-PGD, Croce & Hein 2020),
    ``APGDT(model, eps, steps, targets, seed)`` (APGD with the targeted DLR loss, AutoAttack's APGD-T),
    ``MIFGSM(model, eps, steps, alpha, mu, loss)``; each also takes
    ``worst_case`` and has ``run(x, y) -> AttackResult(x_adv, success)``,
    ``CWA(models, eps, steps, ...)`` (MI-Common-Weakness on a list of
    surrogates, Chen et al. 2024); ``build_gradient_attack(name, ...)``.
Query attack (:mod:`.square`)
    ``SquareAttack(model, eps, norm="linf"|"l2", n_queries, p_init, loss,
    seed)``; ``attack.run(x, y)`` also returns the queries spent per image
    (each forward pass on an image counts once) in a :class:`SquareResult`.
Losses (:mod:`.losses`, :mod:`.expression`)
    per-sample and "larger is more adversarial": ``ce``, ``margin``, ``dlr``,
    ``file:PATH`` (a searched loss), a name given to ``register_loss``, or any
    callable ``loss(logits, y) -> (N,)``, passed as ``loss=...``;
    ``SearchedLoss`` compiles an expression tree of AutoLoss-AR's search
    space (paper 004) to torch, ``load_loss_file`` reads one.
Measures (:mod:`.metrics`, :mod:`.smoothness`)
    ``accuracy``/``predict``; ``transferability`` (TSR, EDLCM eq. 12);
    ``hessian_lambda_max`` (input-Hessian power iteration), ``hvp``,
    ``fd_hvp``, ``input_gradient``, ``gradient_cosine``.

Example::

    from fedrobust.attacks import APGD, SquareAttack, accuracy

    ensemble.eval()
    x_adv = APGD(ensemble, eps=8 / 255, steps=100, loss="dlr")(x, y)
    result = SquareAttack(ensemble, eps=8 / 255, n_queries=500).run(x, y)
    print(accuracy(ensemble, x_adv, y), accuracy(ensemble, result.x_adv, y), result.queries.float().mean())
"""

from .gradient import (APGD, APGDT, BIM, CWA, FGSM, MIFGSM, NONFINITE, NORMS, PGD, NonFiniteLoss, build_gradient_attack,
                       targeted_dlr)
from .expression import LossExpressionError, SearchedLoss, load_loss_file
from .losses import LOSSES, attack_loss, loss_identity, margin, register_loss
from .metrics import accuracy, predict, transferability
from .smoothness import fd_hvp, gradient_cosine, hessian_lambda_max, hvp, input_gradient
from .square import SquareAttack, SquareResult
from .worst_case import AttackResult, Robust, WorstCase, robust_images, worst_case_accuracy

__all__ = [
    "APGD", "APGDT", "AttackResult", "BIM", "CWA", "FGSM", "LOSSES", "LossExpressionError", "MIFGSM", "NONFINITE", "NORMS",
    "NonFiniteLoss",
    "PGD", "Robust", "SearchedLoss", "SquareAttack", "SquareResult", "WorstCase", "accuracy", "robust_images",
    "targeted_dlr", "worst_case_accuracy",
    "attack_loss", "build_gradient_attack", "load_loss_file", "loss_identity", "register_loss", "fd_hvp", "gradient_cosine", "hessian_lambda_max", "hvp",
    "input_gradient", "margin", "predict", "transferability",
]
