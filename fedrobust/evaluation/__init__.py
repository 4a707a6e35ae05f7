"""Evaluation: transfer (CWA, MI-FGSM, PGD on a surrogate zoo), query (Square), white-box attacks,
TSR between members, and smoothness diagnostics."""

from .gradient import APGD, BIM, CWA, FGSM, MIFGSM, PGD
from .metrics import accuracy, transferability
from .smoothness import fd_hvp, gradient_cosine, hessian_lambda_max, hvp
from .square import SquareAttack, SquareResult

__all__ = [
    "APGD", "BIM", "CWA", "FGSM", "MIFGSM", "PGD", "SquareAttack", "SquareResult", "accuracy",
    "fd_hvp", "gradient_cosine", "hessian_lambda_max", "hvp", "transferability",
]
