"""Event sources: kernel readiness turned into typed, frozen events on trio channels.

Conventions every source follows (see ``_base.py``):

* a source is an object with ``async def run(self, send, *, task_status)``: it opens its fds,
  calls ``task_status.started()`` only once they are open and armed, then sends events into
  ``send`` (a ``trio.MemorySendChannel``, bounded: a slow consumer applies backpressure) until
  cancelled; it closes ``send`` and every fd it opened when it returns, also on cancellation;
* it never decides anything: events carry what was observed and when
  (``trio.current_time()``, the monotonic clock unless a test installs another);
* ``statistics()`` returns a frozen snapshot: events sent, kernel wakeups, source specifics.
"""
