"""The output last computed from one input tensor, for the sibling layers that read the same tensor.

q, k and v (and each adapter's dropout) are fed the very same activation in one forward; what is
computed from it once (its autocast cast, its dropout) serves them all. The input is held weakly (a
freed tensor never matches, even if its memory is reused) and checked by a key (its version, and
whatever else the output depends on); the output strongly, because autograd keeps only its storage,
not the Python object a weak reference would need. At most one activation-sized tensor is kept.
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable

import torch


class LastInputMemo:
    """One (input, key) -> output entry.

    A plain slotted object, written on the host in every forward: as an attribute of an ``nn.Module``
    each write would take the module's ``__setattr__``, which searches its parameter, buffer and
    submodule dicts first.
    """

    __slots__ = ("_input", "_key", "_output")

    def __init__(self) -> None:
        self._input: weakref.ref | None = None
        self._key: Hashable = None
        self._output: torch.Tensor | None = None

    def get(self, x: torch.Tensor, key: Hashable) -> torch.Tensor | None:
        """The output kept for ``x`` under ``key``, or ``None``."""
        if self._output is not None and self._input is not None and self._input() is x and self._key == key:
            return self._output
        return None

    def put(self, x: torch.Tensor, key: Hashable, output: torch.Tensor) -> torch.Tensor:
        """Keep ``output`` for ``x`` under ``key`` (replacing the last entry); returns ``output``."""
        self._input, self._key, self._output = weakref.ref(x), key, output
        return output
