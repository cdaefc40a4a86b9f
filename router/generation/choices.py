"""A request's n choices together: interleaved as they stream, or each collected whole."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from k2serve.router.generation.choice import collect_choice
from k2serve.router.generation.events import ChoiceResult, Event


async def merge_choices(streams: list[AsyncIterator[Event]]) -> AsyncIterator[tuple[int, Event]]:
    """Interleave n choice streams as (index, event); cancelling the consumer cancels them all."""
    if len(streams) == 1:
        async for event in streams[0]:
            yield 0, event
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[Event]) -> None:
        try:
            async for event in stream:
                await queue.put((i, event, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, None, exc))
        await queue.put((i, None, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, event, exc = await queue.get()
            if exc is not None:
                raise exc
            if event is None:
                remaining -= 1
            else:
                yield i, event
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect_all(streams: list[AsyncIterator[Event]]) -> list[ChoiceResult]:
    """Every choice run to completion, concurrently; cancelling the caller cancels them all."""
    tasks = [asyncio.create_task(collect_choice(s)) for s in streams]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
