"""The object heap's freeze (server/runtime/object_heap.py): what is alive leaves the collector's
passes, cyclic garbage does not survive it, and what an earlier call froze is collected once it
becomes garbage."""

from __future__ import annotations

import gc
import weakref

import pytest

from server.runtime.object_heap import freeze_long_lived


@pytest.fixture(autouse=True)
def no_automatic_collection():
    """Only the calls under test collect: an automatic pass could free the garbage first."""
    gc.disable()
    yield
    gc.enable()


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> Node:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return a


def tracked(obj: object) -> bool:
    """Whether a full collection would visit `obj` (frozen objects are in no generation)."""
    return any(o is obj for o in gc.get_objects())


def test_live_objects_are_frozen_and_cyclic_garbage_is_collected():
    live = cycle()
    garbage = weakref.ref(cycle())  # unreachable at once; only the collector can free a cycle
    assert garbage() is not None and tracked(live)
    frozen = freeze_long_lived()
    assert garbage() is None
    assert not tracked(live) and not tracked(live.other)
    assert frozen > 0


def test_what_an_earlier_call_froze_is_collected_once_it_is_garbage():
    held = cycle()
    freeze_long_lived()
    assert not tracked(held)
    dropped = weakref.ref(held)
    del held  # frozen and now unreachable: a plain collection would never visit it
    gc.collect()
    assert dropped() is not None
    freeze_long_lived()
    assert dropped() is None
