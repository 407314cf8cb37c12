"""What a backing tier hands back: tensor specs and handles on copies in flight."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorSpec:
    """Shape, dtype and device of one optimizer-state tensor, as it must look when it is resident."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def nbytes(self) -> int:
        """Size in bytes."""
        return _numel(self.shape) * self.dtype.itemsize

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorSpec:
        """The spec of an existing tensor."""
        return cls(tuple(tensor.shape), tensor.dtype, tensor.device)


class Transfer:
    """A copy in flight. ``wait()`` blocks until it is done; ``done()`` asks without blocking.

    ``released()`` says whether the memory the copy reads from may be reused, which can come before the copy is
    done: a disk write that staged device tensors on the host no longer needs them. It is ``done()`` unless the
    tier says otherwise.

    ``discard()`` is ``wait()`` for a fetch whose tensors will not be used: it waits only for what must finish
    before they are dropped, which can be less (a disk read staged on the host need not be copied to the device).
    It is ``wait()`` unless the tier says otherwise.
    """

    def __init__(
        self,
        wait: Callable[[], None] | None = None,
        done: Callable[[], bool] | None = None,
        released: Callable[[], bool] | None = None,
        discard: Callable[[], None] | None = None,
    ) -> None:
        self._wait, self._done, self._released, self._discard = wait, done, released, discard

    @classmethod
    def from_future(cls, future: Future, released: Callable[[], bool] | None = None) -> Transfer:
        """A transfer run by a background thread; its exceptions surface in ``wait()``."""
        return cls(wait=future.result, done=future.done, released=released)

    def wait(self) -> None:
        """Block until the copy is complete."""
        if self._wait is not None:
            self._wait()

    def discard(self) -> None:
        """Block until the copy's tensors may be dropped unused; raises what ``wait()`` would for a failed read."""
        if self._discard is None:
            self.wait()
        else:
            self._discard()

    def done(self) -> bool:
        """Whether the copy is complete."""
        return True if self._done is None else self._done()

    def released(self) -> bool:
        """Whether the source tensors' memory may be reused."""
        return self.done() if self._released is None else self._released()


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
