"""Red team (stop 21, cold): the cold memo's bulk node reading (h-index2) and the F1 budget rule (cb2afee).

The memo's bulk reading is compared with the exact reader node by node on hostile node lists; the budget rule is
attacked with SendBudget alone (the race is the budget's).
"""

from __future__ import annotations

import asyncio
import random

import pytest
from google.protobuf import struct_pb2

from istioctl_proxy import wire
from istioctl_proxy.budget import SendBudget
from istioctl_proxy.errors import ResourceExhausted

from .helpers import pb_field as _field
from .waits import until

# -- 1. The cold memo's bulk node reading -------------------------------------------------------------------------


def _meta(ns: str) -> bytes:
    s = struct_pb2.Struct()
    s.fields["NAMESPACE"].string_value = ns
    return s.SerializeToString()


def _piece(r: random.Random) -> bytes:
    return r.choice([
        _field(1, 2, r.choice([b"a", b"bb.ns-1", "\u00e9".encode(), b"\xff", b"\xed\xa0\x80", b"", b"\xef\xbf\xbe"])),
        _field(1, 0), _field(1, 5), _field(1, 1), _field(1, 3), _field(1, 3, _field(1, 2, b"in-group")),
        _field(3, 2, _meta(r.choice(["ns-1", "ns-2", ""]))), _field(2, 2, b"cluster"),
        b"\n\x80\x01" + b"q" * 128, b"\n\x81\x00a",  # ids with overlong length prefixes
        _field(16, 2, _field(1, 2, b"inner")), bytes([r.randrange(256)]),
        _field(1, 2, b"z" * r.choice([0x7F, 0x80, (1 << 14) - 3, (1 << 14) - 2, 1 << 14])),  # frames at 16 KiB
    ])


def test_the_bulk_node_reading_is_the_exact_readers_on_hostile_node_lists() -> None:
    """Node lists whose id fields are misaligned (a node without an id, the next with two, field 1 of another wire
    type, in a group), ids with overlong length prefixes, nodes each side of the 16 KiB framing table, nodes that are
    prefixes of others, ids that are not UTF-8: every node's (id, namespace) is the exact reader's, whatever the
    other nodes of the list (the memo keeps each as a pure fact of the node's bytes, so no replica can poison it)."""
    r = random.Random(21)
    for _ in range(4000):
        nodes = [b"".join(_piece(r) for _ in range(r.randrange(4))) for _ in range(r.randrange(1, 5))]
        if r.random() < 0.3:
            nodes.append(nodes[0][: r.randrange(len(nodes[0]) + 1)])  # a prefix of another node
        assert wire._nodes_facts(nodes) == list(map(wire._node_facts, nodes)), nodes


def test_a_node_without_an_id_beside_a_node_with_two_is_not_given_the_others_id() -> None:
    """As many ids as nodes, misaligned: node 1 has none (its field 1 is a varint), node 2 two. Each node's first
    byte is not field 1's LEN tag, so the count is not trusted: each node is read as the exact reader reads it
    (node 2: the first of its two ids, never its second, another namespace's proxy)."""
    no_id = _field(1, 0) + _field(3, 2, _meta("ns-1"))
    two = _field(1, 2, b"victim.ns-2") + _field(1, 2, b"other.ns-1") + _field(3, 2, _meta("ns-2"))
    facts = wire._nodes_facts([no_id, two])
    assert facts == [wire._node_facts(no_id), ("victim.ns-2", "ns-2")]
    assert facts[0] is not None and facts[0][1] == "ns-1"


# -- 2. The F1 budget rule (pin_room) ------------------------------------------------------------------------------


async def test_one_never_reading_credential_does_not_refuse_every_big_answer() -> None:
    """One token, one request: its whole-budget answer is granted (no pins yet), never read, cut by --send-timeout
    and pinned. With a pool as large as the budget that filled it, pin_room was the overflow's share: for the pin's
    life (390 s with the defaults) every caller's answer over half the budget (a big mesh's syncz) was refused
    "left unread", even a caller who reads at once. The pool is now twice the budget: one caller pins less than
    its share plus one answer, so a whole answer still fits past any one caller's pins."""
    budget = SendBudget(100, slow_reader_seconds=60.0, pin_seconds=600.0)
    async with budget.hold("never-reads", 100, 1.0) as evicted:
        budget.pin(evicted, 100)  # the send timeout's cut
    assert budget.pinned == 100 and budget.used == 0
    # Observed before: ResourceExhausted "answers that other callers left unread hold 100.0 MiB ...".
    async with budget.hold("reads-at-once", 60, 0.2):
        assert budget.used == 60
    async with budget.hold("reads-at-once", 100, 0.2):  # a whole answer
        assert budget.used == 100


async def test_one_caller_at_its_most_pinned_still_leaves_room_for_a_whole_answer() -> None:
    """The most one caller can pin: just under its share, then one whole answer (it is refused only once its pins
    reach the share). Past that, another caller's whole answer could still be pinned."""
    budget = SendBudget(100, slow_reader_seconds=60.0, pin_seconds=600.0)
    for size in (49, 100):
        async with budget.hold("never-reads", size, 1.0) as evicted:
            budget.pin(evicted, size)
    with pytest.raises(ResourceExhausted, match="cut unread"):
        async with budget.hold("never-reads", 1, 0.05):
            pass
    assert budget.pinned == 149 and budget.pin_room >= budget.total
    async with budget.hold("reads-at-once", 100, 0.2):
        assert budget.used == 100


async def test_never_reading_credentials_refuse_big_answers_at_two_and_every_answer_at_three() -> None:
    """The bound that is left (memory before availability): the pool and the overflow's share hold 2.5 budgets of
    pins. Two credentials that each pin a whole answer fill the pool: answers over the share are refused (they
    could not be pinned), smaller ones still go out. A third's pin fills the overflow's share: every answer is
    refused until the pins expire. Neither is ever granted and then frozen in the live budget."""
    budget = SendBudget(100, slow_reader_seconds=60.0, pin_seconds=600.0)
    for caller in ("a", "b"):
        async with budget.hold(caller, 100, 1.0) as evicted:
            budget.pin(evicted, 100)
    assert budget.pinned == 200 and budget.pin_room == 50 and budget.used == 0
    with pytest.raises(ResourceExhausted, match="left unread"):
        async with budget.hold("reads", 60, 0.05):
            pass
    async with budget.hold("reads", 50, 0.2) as evicted:
        budget.pin(evicted, 50)  # the third never read it either: its room stays taken in the live budget
    assert budget.overflow == 50 and budget.used == 50 and budget.pin_room == 0
    with pytest.raises(ResourceExhausted, match="left unread"):
        async with budget.hold("d", 1, 0.05):
            pass
    assert budget.used == 50 and not budget._waiting


async def test_a_big_answer_that_could_be_pinned_is_not_starved_by_small_ones_passing_it() -> None:
    """While a pin exists an answer is granted only if it could still be pinned: answers in flight count against
    that room. An answer that is not is passed by the others; but one that could be once the answers in flight end
    (it fits pin_room alone) was passed for ever by a stream of small answers (one token, reading at once, several
    streams), each granted while the others were in flight: refused "left unread" at its deadline."""
    budget = SendBudget(100, slow_reader_seconds=60.0, pin_seconds=600.0)
    for caller, size in (("cut-once", 100), ("cut-too", 60)):
        async with budget.hold(caller, size, 1.0) as evicted:
            budget.pin(evicted, size)
    assert budget.pin_room == 90
    stop = asyncio.Event()
    grants = 0

    async def small(i: int) -> None:
        nonlocal grants
        while not stop.is_set():
            async with budget.hold("one-token", 20, 30.0):
                grants += 1
                await asyncio.sleep(0.01)  # its caller reading the answer

    async def big() -> int:
        async with budget.hold("big-syncz", 80, 30.0):
            return budget.answers_used

    smalls = [asyncio.create_task(small(i)) for i in range(2)]
    try:
        await until(lambda: grants >= 2, "the small answers under way")
        # Observed: ResourceExhausted "answers that other callers left unread hold 60.0 MiB ..." at its deadline.
        assert await big() == 80
    finally:
        stop.set()
        await asyncio.gather(*smalls, return_exceptions=True)
    assert budget.answers_used == 0 and budget.used == 0


async def test_the_counters_do_not_drift_when_holds_are_cancelled_cut_pinned_or_pinned_late() -> None:
    """answers_used and overflow return to 0 whatever happens to a hold: cancelled while waiting or as it is
    granted, pinned twice, pinned after its release, pinned partly past the pool, released after its pin."""
    budget = SendBudget(100, slow_reader_seconds=60.0, pin_seconds=0.05)
    async with budget.hold("a", 100, 1.0) as evicted_a:
        waiting = asyncio.create_task(budget.hold("b", 50, 5.0).__aenter__())
        await until(lambda: budget.waiting("b") == 1, "b waiting")
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        budget.pin(evicted_a, 100)
        budget.pin(evicted_a, 100)  # twice: once
    async with budget.hold("b2", 80, 1.0) as evicted_b2:
        budget.pin(evicted_b2, 80)
    late = None
    async with budget.hold("c", 40, 1.0) as evicted_c:
        late = evicted_c
        budget.pin(evicted_c, 40)  # half in the pool, half past it
        assert budget.pinned == 200 and budget.overflow == 20 and budget.used == 40 + 20 and budget.answers_used == 0
    budget.pin(late, 40)  # after its release: nothing
    async with budget.hold("d", 10, 1.0) as evicted_d:
        pass
    budget.pin(evicted_d, 10)
    assert budget.answers_used == 0
    await until(lambda: budget.pinned == 0 and budget.overflow == 0 and budget.used == 0, "the pins to expire")
    with pytest.raises(ResourceExhausted):  # the refused path leaves nothing behind either
        async with budget.hold("e", 100, 1.0) as evicted_e:
            budget.pin(evicted_e, 100)
            async with budget.hold("e", 10, 0.05):
                pass
    await until(lambda: budget.pinned == 0 and budget.used == 0, "the pin to expire")
    assert budget.answers_used == 0 and budget.overflow == 0 and not budget._waiting
