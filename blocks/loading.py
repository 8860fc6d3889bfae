"""Reading a saved block from sync code, typed."""

from __future__ import annotations

from typing import TypeVar

from prefect.blocks.core import Block

from fabloop.blocks.connections import DEFAULT

B = TypeVar("B", bound=Block)


def load_block(block: type[B], name: str = DEFAULT) -> B:
    """The saved block ``name`` of type ``block``, read now.

    ``Block.load`` is typed as "the block or a coroutine" (it dispatches on the
    caller); flows, tasks and the CLI are sync, so they always get the block.
    """
    loaded = block.load(name)
    if not isinstance(loaded, block):
        raise TypeError(f"{block.__name__}.load({name!r}) returned {type(loaded).__name__}, not the block")
    return loaded
