"""PrioritySlots: the most urgent waiter takes a freed slot (pure asyncio, no server)."""

from __future__ import annotations

import asyncio

import pytest

from sweeperd.slots import PrioritySlots


def test_freed_slots_go_to_the_highest_priority_then_the_first_to_ask() -> None:
    async def main() -> list[str]:
        slots = PrioritySlots(1)
        order: list[str] = []
        await slots.acquire(0)  # busy

        async def want(name: str, priority: float) -> None:
            async with slots.take(priority):
                order.append(name)
                await asyncio.sleep(0)

        tasks = [
            asyncio.ensure_future(want(name, p))
            for name, p in [("low", 1), ("high", 9), ("mid-a", 5), ("mid-b", 5), ("top", 50)]
        ]
        await asyncio.sleep(0.01)
        slots.release()
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(main()) == ["top", "high", "mid-a", "mid-b", "low"]


def test_bookkeeping_goes_first_and_a_free_slot_is_taken_at_once() -> None:
    async def main() -> list[str]:
        slots = PrioritySlots(2)
        order: list[str] = []
        await slots.acquire(1)
        await slots.acquire(1)
        assert slots.locked()

        async def work() -> None:
            async with slots.take(1000):
                order.append("work")

        async def bookkeeping() -> None:
            async with slots:
                order.append("bookkeeping")

        tasks = [asyncio.ensure_future(work()), asyncio.ensure_future(bookkeeping())]
        await asyncio.sleep(0.01)
        slots.release()
        slots.release()
        await asyncio.gather(*tasks)
        assert not slots.locked()
        return order

    assert asyncio.run(main()) == ["bookkeeping", "work"]


def test_a_cancelled_waiter_never_loses_a_slot() -> None:
    async def main() -> bool:
        slots = PrioritySlots(1)
        await slots.acquire()
        waiter = asyncio.ensure_future(slots.acquire(5))
        other = asyncio.ensure_future(slots.acquire(1))
        await asyncio.sleep(0.01)
        slots.release()  # handed to the waiter ...
        waiter.cancel()  # ... which is cancelled before it runs: the slot passes on
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await asyncio.wait_for(other, 1)
        slots.release()
        return not slots.locked()

    assert asyncio.run(main())
