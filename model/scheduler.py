"""A scheduler thread that serves concurrent requests from one Engine, all in flight decoded in one batch.

Requests join and leave between steps, and a request that fails ends alone.

Usage
-----
    from model.engine import Engine
    from model.sampling import SamplingParams
    from model.scheduler import Scheduler, single_torch_thread

    threads = single_torch_thread()                       # before loading the model (see Scheduler)
    sched = Scheduler(Engine(model, tokenizer, max_batch=16), threads=threads)  # a thread; all in flight is one batch
    for delta in sched.stream(messages, SamplingParams(temperature=0)): ...  # from any thread
    req = sched.submit(messages, params, on_event)        # on_event(delta, finish_reason) runs on its thread
    sched.cancel(req)                                     # e.g. the client left: its slot is freed before the next step
"""
import logging
import queue
import threading
import time
from collections import deque
from typing import Callable, Optional

import torch

from .sampling import SamplingParams

log = logging.getLogger(__name__)


def single_torch_thread():
    """Switch this thread to one torch CPU thread and return the count it had: call it before loading a model
    that a Scheduler will serve, then pass the count on as Scheduler(..., threads=count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


class Scheduler:
    """Serves concurrent requests from one Engine on a background thread. Requests join (prefill) and leave
    (done or cancelled) between steps, and each step decodes everything in flight in one batched forward.

    threads: torch CPU threads of that thread (default: the count of the thread that builds the scheduler).
    Load the model with torch.set_num_threads(1) where you can (see single_torch_thread): once two threads
    each own an OpenMP worker pool, libgomp stops its workers spinning between parallel regions, and on a
    2-core CPU every decode step then took 1.5x as long."""

    def __init__(self, engine, threads=None):
        self.engine = engine
        self.threads = threads or torch.get_num_threads()
        self.waiting = deque()
        self.cond = threading.Condition()
        self.steps = 0
        self.busy_seconds = {"prefill": 0.0, "decode": 0.0}  # time the engine spent working (see stats())
        self._closed = False
        self.thread = threading.Thread(target=self._run, name="minimind-scheduler", daemon=True)
        self.thread.start()

    def submit(self, prompt, params=None, on_event: Callable[[str, Optional[str]], None] = None):
        """Queue a request; on_event(delta, finish_reason) is called on the scheduler thread."""
        req = self.engine.prepare(prompt, params, on_event)
        with self.cond:
            self.waiting.append(req)
            self.cond.notify()
        return req

    def submit_many(self, prompts, params=None, on_events=None):
        """Queue several requests at once, so they are prefilled together (the legacy completions' batches);
        on_events: one callback per prompt, or None."""
        on_events = on_events or [None] * len(prompts)
        reqs = [self.engine.prepare(p, params, on) for p, on in zip(prompts, on_events, strict=True)]
        with self.cond:
            self.waiting.extend(reqs)
            self.cond.notify()
        return reqs

    def cancel(self, req):
        req.cancelled = True
        with self.cond:
            self.cond.notify()

    def stream(self, prompt, params=None, **overrides):
        """Text deltas of one answer, from any thread; closing the generator early cancels the request."""
        events = queue.Queue()
        req = self.submit(prompt, SamplingParams.make(params, **overrides), lambda d, f: events.put((d, f)))
        try:
            while True:
                delta, finish = events.get()
                if delta:
                    yield delta
                if finish:
                    if finish == "error":
                        raise RuntimeError("generation failed (see the server log)")
                    return
        finally:
            if req.finish_reason is None:
                self.cancel(req)

    def stats(self):
        return {"active": len(self.engine.active), "waiting": len(self.waiting), "max_batch": self.engine.max_batch,
                "steps": self.steps, **self.engine.counters,
                **{f"{k}_seconds": round(v, 3) for k, v in self.busy_seconds.items()}}

    def close(self):
        with self.cond:
            self._closed = True
            self.cond.notify()
        self.thread.join(timeout=10)

    def _prefill(self, group):
        """Prefill a group together; if that forward fails, each request alone, so only the culprit fails."""
        try:
            self.engine.add_many(group)
            return
        except Exception:
            if len(group) == 1:
                log.exception("prefill failed; failing that request alone")
                self.engine.fail(group[0])
                return
        for req in group:
            self._prefill([req])

    def _run(self):
        torch.set_num_threads(self.threads)  # per thread under OpenMP
        engine = self.engine
        while True:
            with self.cond:
                while not self._closed and not self.waiting and not engine.active:
                    self.cond.wait()
                if self._closed:
                    return
                joining = []
                while self.waiting and len(engine.active) + len(joining) < engine.max_batch:
                    joining.append(self.waiting.popleft())
            try:
                started = time.perf_counter()
                for req in [r for r in joining if r.cancelled]:
                    engine.cancel(req)
                for group in engine.prefill_groups([r for r in joining if not r.cancelled]):
                    self._prefill(group)
                for req in [r for r in engine.active if r.cancelled]:
                    engine.cancel(req)
                decoding = time.perf_counter()
                if engine.active:
                    engine.step()
                    self.steps += 1
                self.busy_seconds["prefill"] += decoding - started
                self.busy_seconds["decode"] += time.perf_counter() - decoding
            except Exception:  # a decode forward is shared by the whole batch: it fails them all
                log.exception("decode step failed; failing the requests in flight")
                for req in list(engine.active) + [r for r in joining if r.slot is None and not r.finish_reason]:
                    engine.fail(req)
