"""The checks of ``update_model``, standard library only (so they are tested without torch).

``plan_update`` compares what a model holds with what a version folder offers, by name, dtype
and shape, and either answers which checkpoint tensors go where or raises
``ModelMismatchError`` naming every mismatch. Nothing is touched here; ``update_model``
(torch_loader.py) touches the model only after this has passed.
"""

from __future__ import annotations

from typing import Any, Dict, Hashable, List, Mapping, Sequence, Tuple

from .errors import WeightfsError

__all__ = ["ModelMismatchError", "plan_update"]

Spec = Tuple[Any, Sequence[int]]  # (dtype, shape); dtypes are compared with ==


class ModelMismatchError(WeightfsError, RuntimeError):
    """The checkpoint does not fit the model: names, dtypes or shapes differ. Raised before any
    parameter or buffer is changed. ``missing``, ``unexpected`` and ``mismatched`` (``(name,
    want, got)`` with ``want``/``got`` as ``(dtype, shape)``) list what was found."""

    def __init__(self, msg: str, missing=(), unexpected=(), mismatched=()):
        super().__init__(msg)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)


def _short(keys, n: int = 10) -> str:
    keys = list(keys)
    s = ", ".join(str(k) for k in keys[:n])
    return s + (f", … ({len(keys)} in all)" if len(keys) > n else "")


def plan_update(targets: Mapping[str, Tuple[Any, Sequence[int], Hashable]],
                sources: Mapping[str, Spec], strict: bool = True, where: str = "") -> List[str]:
    """The checkpoint names to copy, in ``sources`` order; raises ``ModelMismatchError``.

    ``targets``: the model's ``state_dict(keep_vars=True)`` as ``{name: (dtype, shape, tie)}``,
    where names with equal ``tie`` keys are one tensor (tied weights such as ``lm_head.weight``
    and ``embed_tokens.weight``): such a group is satisfied when the checkpoint has any of its
    names. ``sources``: the checkpoint, ``{name: (dtype, shape)}``.

    A dtype or shape that differs always raises (it cannot be copied in place, and rebinding
    would change the model's layout). With ``strict``, so do model names the checkpoint lacks
    (tie groups with none of their names in it) and checkpoint names the model lacks; without
    it those are left alone and skipped.
    """
    covered = {targets[n][2] for n in sources if n in targets}
    missing = [n for n, (_, _, tie) in targets.items() if n not in sources and tie not in covered]
    unexpected = [n for n in sources if n not in targets]
    mismatched = []
    for n, (dt, shape) in sources.items():
        if n not in targets:
            continue
        tdt, tshape, _ = targets[n]
        if tdt != dt or tuple(tshape) != tuple(shape):
            mismatched.append((n, (tdt, tuple(tshape)), (dt, tuple(shape))))
    parts = []
    if mismatched:
        parts.append("dtype or shape differs: " + _short(
            f"{n} (model {w[0]} {list(w[1])}, checkpoint {g[0]} {list(g[1])})"
            for n, w, g in mismatched))
    if strict and missing:
        parts.append(f"missing keys: {_short(missing)}")
    if strict and unexpected:
        parts.append(f"unexpected keys: {_short(unexpected)}")
    if parts:
        raise ModelMismatchError(
            (f"{where}: " if where else "") + "checkpoint does not match the model, nothing "
            "was changed: " + "; ".join(parts),
            missing if strict else (), unexpected if strict else (), mismatched)
    return [n for n in sources if n in targets]

