"""The worker's event loop, driven by the drain loop itself: one thread, no GIL ping-pong.

Transports do their I/O on this loop (libcurl for webhooks, its sockets watched by the loop; a
blocking driver would run in `loop.run_in_executor` and report back with `call_soon_threadsafe`),
or in threads of their own that report with `call_soon_threadsafe` (database sinks). The drain loop
is plain synchronous Django code: it claims and records rows while the loop is paused, then runs
the loop for a slice (`run`) until results come in. A first version ran the loop in a background
thread; every database call then waited for the GIL behind the busy I/O thread (~5 ms switch
interval each time), which cut throughput by an order of magnitude. Pausing the loop during
database work only delays in-flight I/O by that work's milliseconds; deadlines are unaffected
beyond that.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from typing import Any


class Pump:
    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.results: list[Any] = []
        self._wakeup: asyncio.Event | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        self._loop_thread: int | None = None  # the thread running the loop right now

    def report(self, result: Any) -> None:
        """Hand a result to the drain loop. From the loop (coroutines) or any other thread
        (a transport's worker threads): either way the loop wakes up."""
        if threading.get_ident() == self._loop_thread:
            self._report(result)
        else:
            self.loop.call_soon_threadsafe(self._report, result)

    report_threadsafe = report

    def _report(self, result: Any) -> None:
        self.results.append(result)
        if self._wakeup is not None:
            self._wakeup.set()

    def spawn(self, coroutine: Any) -> None:
        """Start a coroutine on the loop; it runs whenever the loop is pumped."""
        task = self.loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def call(self, callback: Callable[..., Any], *args: Any) -> None:
        self.loop.call_soon(callback, *args)

    def run(self, timeout: float) -> list[Any]:
        """Run the loop until at least one result is in, or `timeout` seconds; take them."""
        self._loop_thread = threading.get_ident()
        try:
            if not self.results and timeout > 0:
                self.loop.run_until_complete(self._wait(timeout))
            else:  # one turn: start what is queued, take what threads reported
                self.loop.run_until_complete(asyncio.sleep(0))
        finally:
            self._loop_thread = None
        taken, self.results = self.results, []
        return taken

    async def _wait(self, timeout: float) -> None:
        self._wakeup = asyncio.Event()
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            self._wakeup = None

    def complete(self, coroutine: Any, timeout: float) -> Any:
        self._loop_thread = threading.get_ident()
        try:
            return self.loop.run_until_complete(asyncio.wait_for(coroutine, timeout))
        finally:
            self._loop_thread = None

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            self.loop.run_until_complete(asyncio.gather(*self._tasks, return_exceptions=True))
        self.loop.close()


_pump: Pump | None = None


def pump() -> Pump:
    """This process's pump (a new one after a fork: an event loop does not survive it)."""
    global _pump
    if _pump is None or _pump.pid != os.getpid():
        _pump = Pump()
    return _pump


def close() -> None:
    global _pump
    if _pump is not None and _pump.pid == os.getpid():
        _pump.close()
    _pump = None
