"""What one hop between two processes costs on this machine, the floor under every layer of router_overhead.

The direct layer runs the engine in the load generator's process; the router layer adds four hops
between processes (load generator -> router -> worker -> router -> load generator), each a message
arriving at a process that was waiting for it. This measures that message with the least software
possible: plain asyncio TCP between two Python processes, one way, in both directions, after the
receiver sat idle for `gap_s` (a woken process pays the machine's wake-up latency: on a small virtual
machine that is most of the cost) and back to back. Timestamps are time.perf_counter, which reads
CLOCK_MONOTONIC on Linux and therefore agrees between processes.

    python benchmarks/process_hops.py [--gap-ms 5] [--samples 300]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import struct
import sys
import time
from pathlib import Path

MESSAGE = struct.Struct("<qq")  # (sender's send time ns, the one-way ns the sender measured for the last message)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer each message at once, reporting how long it took to arrive; until the client hangs up."""
    try:
        while True:
            sent_ns, _ = MESSAGE.unpack(await reader.readexactly(MESSAGE.size))
            arrived = time.perf_counter_ns() - sent_ns
            writer.write(MESSAGE.pack(time.perf_counter_ns(), arrived))
    except asyncio.IncompleteReadError:
        writer.close()


async def serve() -> None:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


async def _one_way_ms(port: int, gap_s: float, samples: int) -> dict[str, float]:
    """Median one-way milliseconds to the echo process and back, waiting `gap_s` between messages."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    there, back = [], []
    for _ in range(samples + samples // 10):  # the first tenth warms the connection up and is dropped
        writer.write(MESSAGE.pack(time.perf_counter_ns(), 0))
        sent_ns, arrived_ns = MESSAGE.unpack(await reader.readexactly(MESSAGE.size))
        back.append(time.perf_counter_ns() - sent_ns)
        there.append(arrived_ns)
        if gap_s:
            await asyncio.sleep(gap_s)
    writer.close()
    keep = slice(samples // 10, None)
    return {"to_ms": statistics.median(there[keep]) / 1e6, "back_ms": statistics.median(back[keep]) / 1e6}


async def measure(gap_s: float, samples: int = 300) -> dict[str, float]:
    """One-way hop latencies: `idle_*` after `gap_s` of quiet, `busy_*` back to back (ms, medians)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, str(Path(__file__).resolve()), "--serve",
                                                stdout=asyncio.subprocess.PIPE)
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode().strip()
        if not line.isdigit():
            raise RuntimeError(f"the echo process did not start (said {line!r}); its stderr is above")
        port = int(line)
        idle = await _one_way_ms(port, gap_s, samples)
        busy = await _one_way_ms(port, 0.0, samples)
    finally:
        proc.kill()
        await proc.wait()
    return {"gap_ms": gap_s * 1e3, "idle_to_ms": idle["to_ms"], "idle_back_ms": idle["back_ms"],
            "busy_to_ms": busy["to_ms"], "busy_back_ms": busy["back_ms"]}


def describe(hops: dict[str, float]) -> str:
    """One line: the two one-way latencies in each condition."""
    return (f"process hop (plain asyncio TCP, one way, median): {hops['idle_to_ms']:.2f} / {hops['idle_back_ms']:.2f} ms "
            f"into a process idle for {hops['gap_ms']:.0f} ms / into one that just sent, "
            f"{hops['busy_to_ms']:.2f} / {hops['busy_back_ms']:.2f} ms back to back")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gap-ms", type=float, default=5.0, help="quiet time before each message")
    p.add_argument("--samples", type=int, default=300)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the echo process
    args = p.parse_args(argv)
    if args.serve:
        asyncio.run(serve())
        return 0
    print(describe(asyncio.run(measure(args.gap_ms / 1e3, args.samples))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
