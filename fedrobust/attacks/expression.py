"""Attack losses written as expression trees (AutoLoss-AR, paper 004, sec. IV-B, Table I).

A tree's leaves are the logits ``p``, the one-hot label ``q`` (both (N, C)),
and the constants ``0`` and ``1``. Its inner nodes are the paper's primitives:

==========  ======================================  =====
Add, Mul    x + y, x * y                            2
Neg, Abs    -x, |x|                                 1
Inv         sign(x) / (|x| + gamma)                 1
Sqrt        sign(x) * sqrt(|x| + gamma)             1
Square      x^2                                     1
Exp         e^x                                     1
Log         sign(x) * log(|x| + gamma)              1
Max, Sum    over the class axis, keeping it         1
Softmax     over the class axis                     1
==========  ======================================  =====

A tree's output, (N, C) or (N, 1), summed over the class axis is the
per-sample loss (eq. 9); like :mod:`.losses`, larger is more adversarial,
so an attack maximises it. The protected operators (Inv, Sqrt, Log) are odd
functions, finite with a finite gradient everywhere, 0 at 0 (``gamma`` =
:data:`GAMMA`); Table I prints ``x + gamma``, we use ``|x| + gamma`` so that
they are defined at negative inputs too.

Written here because no maintained library compiles such trees to torch:
DEAP's ``gp.compile`` builds a Python string and passes it to ``eval``. A
tree here is plain data (nested tuples), parsed from text by a small
tokenizer and compiled to a closure over torch operations; no string is ever
evaluated, and a tree read from a file is checked (known primitives, their
arity, depth and size) before it is compiled.

Text form: the prefix form DEAP prints, ``Neg(Mul(q, Log(Softmax(p))))``
(cross-entropy). :func:`simplify` rewrites a tree with identities that hold
exactly in floating point (``Neg(Neg(x)) = x``, ``Mul(x, 1) = x``, sorted
arguments of Add and Mul, a class reduction of an (N, 1) value is itself,
...), so that equivalent trees share one canonical text: the search's
fitness cache key.

Example::

    from fedrobust.attacks import PGD, SearchedLoss

    loss = SearchedLoss.parse("Neg(Mul(q, Log(Softmax(p))))")
    x_adv = PGD(model, eps=0.1, steps=10, loss=loss)(x, y)
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F

from ..errors import one_line

__all__ = [
    "GAMMA", "HAND_MADE", "LOSS_FILE_FORMAT", "MAX_DEPTH", "MAX_NODES", "PRIMITIVES", "TERMINALS", "LossExpressionError",
    "SearchedLoss", "Tree", "depth", "infix", "load_loss_file", "parse", "simplify", "size", "to_text",
]

GAMMA = 1e-6  # the protected operators' gamma (Table I: "a small value to avoid zero division")
MAX_DEPTH = 50  # deeper than any search makes (the paper's md is 25): a deeper tree in a file is refused
MAX_NODES = 20_000
MAX_FILE_BYTES = 1 << 20
LOSS_FILE_FORMAT = "fedrobust-loss/1"

# a tree: a terminal name, or (primitive, child, ...)
Tree = Union[str, tuple]

TERMINALS = ("p", "q", "0", "1")


def _inv(x: torch.Tensor) -> torch.Tensor:
    return x.sign() / (x.abs() + GAMMA)


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    return x.sign() * (x.abs() + GAMMA).sqrt()


def _log(x: torch.Tensor) -> torch.Tensor:
    return x.sign() * (x.abs() + GAMMA).log()


# name -> (arity, torch function); the class axis is dim 1
PRIMITIVES: dict[str, tuple[int, Callable[..., torch.Tensor]]] = {
    "Add": (2, torch.add),
    "Mul": (2, torch.mul),
    "Neg": (1, torch.neg),
    "Abs": (1, torch.abs),
    "Inv": (1, _inv),
    "Sqrt": (1, _sqrt),
    "Square": (1, torch.square),
    "Exp": (1, torch.exp),
    "Log": (1, _log),
    "Max": (1, lambda x: x.amax(1, keepdim=True)),
    "Sum": (1, lambda x: x.sum(1, keepdim=True)),
    "Softmax": (1, lambda x: torch.softmax(x, 1)),
}


def _hand_made() -> dict[str, Tree]:
    k = ("Exp", ("Exp", ("Exp", "1")))  # e^(e^e) ~ 3.8e6, from the constant 1: a "large" number

    def neg(x):
        return ("Neg", x)

    margin = ("Add", ("Max", ("Add", "p", neg(("Mul", "q", k)))), neg(("Sum", ("Mul", "q", "p"))))
    top1 = ("Softmax", ("Mul", k, "p"))  # one-hot of the largest logit
    without1 = ("Add", "p", neg(("Mul", k, top1)))
    top2 = ("Softmax", ("Mul", k, without1))
    third = ("Max", ("Add", without1, neg(("Mul", k, top2))))
    return {
        "ce": neg(("Mul", "q", ("Log", ("Softmax", "p")))),
        "margin": margin,
        "dlr": ("Mul", margin, ("Inv", ("Add", ("Max", "p"), neg(third)))),
    }


class LossExpressionError(ValueError):
    """A loss expression (text, tree or file) that is not a valid tree of the search space; one line."""


# ----------------------------------------------------------------------------------------------- structure

def depth(tree: Tree) -> int:
    """Height as DEAP counts it: a terminal is 0."""
    if isinstance(tree, str):
        return 0
    return 1 + max(depth(c) for c in tree[1:])


def size(tree: Tree) -> int:
    if isinstance(tree, str):
        return 1
    return 1 + sum(size(c) for c in tree[1:])


def to_text(tree: Tree) -> str:
    """The prefix text form, e.g. ``Neg(Mul(q, Log(Softmax(p))))``; :func:`parse` reads it back."""
    if isinstance(tree, str):
        return tree
    return f"{tree[0]}({', '.join(to_text(c) for c in tree[1:])})"


_INFIX_UNARY = {"Abs": "|{}|", "Inv": "inv({})", "Sqrt": "sqrt({})", "Exp": "exp({})", "Log": "log({})",
                "Max": "max_c({})", "Sum": "sum_c({})", "Softmax": "softmax({})"}


def infix(tree: Tree) -> str:
    """A readable form, e.g. ``-(q * log(softmax(p)))``; inv, sqrt and log are the protected operators."""
    if isinstance(tree, str):
        return tree
    op, *args = tree
    if op == "Add":
        a, b = args
        if not isinstance(b, str) and b[0] == "Neg":
            return f"({infix(a)} - {_atom(b[1])})"
        return f"({infix(a)} + {infix(b)})"
    if op == "Mul":
        return f"{_atom(args[0])} * {_atom(args[1])}"
    if op == "Neg":
        return f"-{_atom(args[0])}"
    if op == "Square":
        return f"{_atom(args[0])}^2"
    inner = infix(args[0])
    if not isinstance(args[0], str) and args[0][0] == "Add":
        inner = inner[1:-1]  # max_c(a + b), not max_c((a + b))
    return _INFIX_UNARY[op].format(inner)


def _atom(tree: Tree) -> str:
    text = infix(tree)
    if isinstance(tree, str) or tree[0] not in ("Add", "Mul", "Neg"):
        return text
    return text if text.startswith("(") and text.endswith(")") and tree[0] == "Add" else f"({text})"


def check(tree: Tree, max_depth: int = MAX_DEPTH) -> Tree:
    """``tree`` if every node is a known terminal or a primitive with its arity, within the limits."""
    stack: list[tuple[object, int]] = [(tree, 0)]
    nodes = 0
    while stack:
        node, level = stack.pop()
        nodes += 1
        if level > max_depth:
            raise LossExpressionError(f"the expression is deeper than the limit of {max_depth}")
        if nodes > MAX_NODES:
            raise LossExpressionError(f"the expression has more than {MAX_NODES} nodes")
        if isinstance(node, str):
            if node not in TERMINALS:
                raise LossExpressionError(f"unknown terminal '{node}' (choose from {', '.join(TERMINALS)})")
            continue
        if not isinstance(node, tuple) or not node or not isinstance(node[0], str):
            raise LossExpressionError(f"not an expression node: {str(node)[:60]}")
        name = node[0]
        if name not in PRIMITIVES:
            raise LossExpressionError(f"unknown primitive '{name[:40]}' (choose from {', '.join(PRIMITIVES)})")
        arity = PRIMITIVES[name][0]
        if len(node) - 1 != arity:
            raise LossExpressionError(f"{name} takes {arity} argument(s), got {len(node) - 1}")
        stack.extend((c, level + 1) for c in node[1:])
    return tree


_TOKEN = re.compile(r"\s*(?:([A-Za-z_][A-Za-z0-9_]*|\d+(?:\.\d*)?)|(.))")


def parse(text: str, max_depth: int = MAX_DEPTH) -> Tree:
    """The tree of a prefix text form, checked (see :func:`check`); never evaluated as code."""
    if not isinstance(text, str):
        raise LossExpressionError(f"an expression must be text, got {type(text).__name__}")
    if len(text) > MAX_FILE_BYTES:
        raise LossExpressionError(f"the expression is longer than {MAX_FILE_BYTES} characters")
    tokens = [(m.group(1), m.group(2)) for m in _TOKEN.finditer(text) if m.group(1) or m.group(2)]
    stack: list[list] = []  # open nodes: [name, children...]
    root: Tree | None = None
    i = 0

    def attach(node: Tree) -> None:
        nonlocal root
        if stack:
            stack[-1].append(node)
        elif root is None:
            root = node
        else:
            raise LossExpressionError("text after the end of the expression")

    while i < len(tokens):
        word, punct = tokens[i]
        if word is not None:
            nxt = tokens[i + 1][1] if i + 1 < len(tokens) else None
            if nxt == "(":
                if word not in PRIMITIVES:
                    raise LossExpressionError(f"unknown primitive '{word[:40]}' (choose from {', '.join(PRIMITIVES)})")
                if len(stack) >= max_depth:
                    raise LossExpressionError(f"the expression is deeper than the limit of {max_depth}")
                if root is not None and not stack:
                    raise LossExpressionError("text after the end of the expression")
                stack.append([word])
                i += 2
                continue
            if word not in TERMINALS:
                kind = "primitive" if word[:1].isupper() else "terminal"
                choices = PRIMITIVES if kind == "primitive" else TERMINALS
                raise LossExpressionError(f"unknown {kind} '{word[:40]}' (choose from {', '.join(choices)})")
            attach(word)
        elif punct == ",":
            if not stack or len(stack[-1]) == 1:
                raise LossExpressionError("misplaced ',' in the expression")
        elif punct == ")":
            if not stack:
                raise LossExpressionError("unbalanced ')' in the expression")
            name, *children = stack.pop()
            arity = PRIMITIVES[name][0]
            if len(children) != arity:
                raise LossExpressionError(f"{name} takes {arity} argument(s), got {len(children)}")
            attach((name, *children))
        else:
            raise LossExpressionError(f"unexpected character '{punct}' in the expression")
        i += 1
    if stack:
        raise LossExpressionError("unbalanced '(' in the expression")
    if root is None:
        raise LossExpressionError("the expression is empty")
    return check(root, max_depth)


# ----------------------------------------------------------------------------------------------- simplify

def _shape(tree: Tree) -> str:
    """'C' for an (N, C) value, '1' for an (N, 1) or (1, 1) one."""
    if isinstance(tree, str):
        return "C" if tree in ("p", "q") else "1"
    if tree[0] in ("Max", "Sum"):
        return "1"
    return "C" if any(_shape(c) == "C" for c in tree[1:]) else "1"


def _rewrite(tree: Tree) -> Tree:
    """One node's exact identities, its children already simplified."""
    if isinstance(tree, str):
        return tree
    op, *args = tree
    a = args[0]
    head = None if isinstance(a, str) else a[0]
    if op == "Neg" and head == "Neg":
        return a[1]
    if op == "Abs":
        if head in ("Abs", "Square", "Exp", "Softmax") or a in ("0", "1", "q"):
            return a
        if head == "Neg":
            return ("Abs", a[1])
    if op == "Square":
        if head in ("Neg", "Abs"):
            return ("Square", a[1])
        if a in ("0", "1", "q"):
            return a
    if op == "Exp" and a == "0":
        return "1"
    if op in ("Max", "Sum") and _shape(a) == "1":
        return a  # a reduction over one element
    if op == "Add":
        x, y = sorted(args, key=to_text)
        if "0" in (x, y):
            return y if x == "0" else x
        return ("Add", x, y)
    if op == "Mul":
        x, y = sorted(args, key=to_text)
        if "1" in (x, y):
            return y if x == "1" else x
        return ("Mul", x, y)
    return tree


def simplify(tree: Tree) -> Tree:
    """``tree`` rewritten with identities that hold exactly in floating point (bottom up, to a fixed point).

    Kept out on purpose, because they change a non-finite value: ``Mul(x, 0) = 0``, ``Add(x, Neg(x)) = 0``,
    ``Softmax`` of an (N, 1) value = 1. Add and Mul are commutative in IEEE arithmetic, so their arguments
    are sorted; they are not associative, so nothing is regrouped.
    """
    if isinstance(tree, str):
        return tree
    node = (tree[0], *(simplify(c) for c in tree[1:]))
    while True:
        out = _rewrite(node)
        if out == node:
            return node
        node = out if isinstance(out, str) else (out[0], *(simplify(c) for c in out[1:]))


# ----------------------------------------------------------------------------------------------- compile

def _compile(tree: Tree) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    if isinstance(tree, str):
        return lambda leaves: leaves[tree]
    fn = PRIMITIVES[tree[0]][1]
    children = [_compile(c) for c in tree[1:]]
    if len(children) == 1:
        (c0,) = children
        return lambda leaves: fn(c0(leaves))
    c0, c1 = children
    return lambda leaves: fn(c0(leaves), c1(leaves))


class SearchedLoss:
    """A per-sample attack loss from an expression tree: ``loss(logits, y) -> (N,)``, larger = more adversarial.

    Parameters
    ----------
    tree
        The expression (nested tuples; see the module docstring). It is checked, then compiled to torch
        operations.
    name
        What results and logs call it (default: the text form).
    """

    def __init__(self, tree: Tree, name: str | None = None) -> None:
        self.tree = check(tree)
        self.text = to_text(self.tree)
        self.name = name or self.text
        self._fn = _compile(self.tree)
        self._uses_logits = _mentions(self.tree, "p")

    @classmethod
    def parse(cls, text: str, name: str | None = None) -> SearchedLoss:
        return cls(parse(text), name)

    @property
    def infix(self) -> str:
        return infix(self.tree)

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        one = logits.new_ones((1, 1))
        leaves = {"p": logits, "q": F.one_hot(y, logits.shape[1]).to(logits.dtype), "0": one * 0, "1": one}
        out = self._fn(leaves)
        per_sample = out.expand(logits.shape[0], out.shape[1]).sum(1)  # eq. 9, per sample
        if not self._uses_logits:  # a constant loss: keep the graph, with a zero gradient
            per_sample = per_sample + 0 * logits.sum(1)
        return per_sample

    def __repr__(self) -> str:
        return f"SearchedLoss({self.text!r})"


def _mentions(tree: Tree, leaf: str) -> bool:
    if isinstance(tree, str):
        return tree == leaf
    return any(_mentions(c, leaf) for c in tree[1:])


def load_loss_file(path: str | os.PathLike) -> SearchedLoss:
    """The loss a search wrote (``best.json``: format :data:`LOSS_FILE_FORMAT`, key ``expression``).

    Raises :class:`LossExpressionError` (one line, naming the file) for an unreadable, oversized,
    malformed or hostile file: an unknown primitive, a wrong arity, a depth over :data:`MAX_DEPTH`.
    """
    path = Path(path)
    try:
        if not path.is_file():
            raise LossExpressionError("no such file")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise LossExpressionError(f"larger than {MAX_FILE_BYTES} bytes")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except RecursionError:
            raise LossExpressionError("nested too deeply to be a loss file") from None
        except (UnicodeDecodeError, ValueError) as exc:
            raise LossExpressionError(f"not JSON ({one_line(exc)})") from None
        if not isinstance(data, dict) or not isinstance(data.get("expression"), str):
            raise LossExpressionError("expected a JSON object with an 'expression' string (a best.json "
                                      "written by fedrobust search-loss)")
        fmt = data.get("format", LOSS_FILE_FORMAT)
        if fmt != LOSS_FILE_FORMAT:
            raise LossExpressionError(f"format '{str(fmt)[:40]}' is not {LOSS_FILE_FORMAT}")
        tree = parse(data["expression"])
    except LossExpressionError as exc:
        raise LossExpressionError(f"{path}: {exc}") from None
    except OSError as exc:
        raise LossExpressionError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    return SearchedLoss(tree, name=f"file:{path}")


# The hand-made losses of :mod:`.losses` as trees of this space (cross-entropy up to the protected log's gamma;
# margin and DLR wherever the logits' gaps are far above 1 / e^(e^e))
HAND_MADE: dict[str, Tree] = _hand_made()
