#!/usr/bin/env python3
"""Terminate this rented GPU instance when nobody uses it, or when it has lived too long (stdlib only).

Installed on the Lambda instance by the remote70b stack and run there by systemd. Lambda bills an
instance from launch until it is terminated, whether or not the model serves anything, and an
instance cannot be stopped, only terminated; so this watches the model server's own metrics and
terminates the instance through Lambda's API:

- idle: no request finished, ran or waited in vLLM for ``DREAMSEED_IDLE_SECONDS`` (default one
  hour). Activity is read from vLLM's Prometheus counters (``vllm:request_success_total``,
  ``vllm:num_requests_running``, ``vllm:num_requests_waiting``): an SSH session, a health probe or
  Prometheus's own scrape is not use. Until vLLM answers (first start downloads the weights) the
  instance counts as idle from the watchdog's start, so a server that never comes up is not billed
  forever either.
- lifetime: ``DREAMSEED_MAX_LIFETIME_SECONDS`` (default 24 hours) after the instance booted,
  whatever the traffic: a hard ceiling on a forgotten instance's bill.

0 turns either check off. Settings come from the environment (systemd's EnvironmentFile, root-only):
LAMBDA_API_URL, LAMBDA_API_KEY, LAMBDA_INSTANCE_ID, DREAMSEED_METRICS_URL (default
http://127.0.0.1:8000/metrics), DREAMSEED_POLL_SECONDS (default 60).
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

# vLLM's counters and gauges that mean someone is using the model.
FINISHED = "vllm:request_success_total"
BUSY = ("vllm:num_requests_running", "vllm:num_requests_waiting")


def read_activity(text: str) -> tuple[float, float] | None:
    """(requests finished so far, requests running or waiting now) from a Prometheus text page;
    None when the page has none of vLLM's request metrics."""
    finished = busy = 0.0
    seen = False
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_and_labels, _, rest = line.rpartition(" ")
        name = name_and_labels.split("{", 1)[0].strip()
        try:
            value = float(rest)
        except ValueError:
            continue
        if name == FINISHED:
            finished += value
            seen = True
        elif name in BUSY:
            busy += value
            seen = True
    return (finished, busy) if seen else None


@dataclass
class Watchdog:
    """The decision, apart from I/O and time: feed it what the metrics said at each poll. Times
    are seconds on one clock; `booted` is when the instance started (its lifetime counts from
    there) and `last_activity` starts at the watchdog's own start (a restarted watchdog must not
    take the hours before it for idleness)."""

    idle_seconds: float
    max_lifetime_seconds: float
    booted: float
    last_activity: float
    last_finished: float | None = None

    def observe(self, now: float, activity: tuple[float, float] | None) -> str | None:
        """Record one poll; returns why to terminate now, or None."""
        if activity is not None:
            finished, busy = activity
            # A restarted vLLM starts its counters at 0 again: any change counts as use.
            if busy > 0 or (self.last_finished is not None and finished != self.last_finished):
                self.last_activity = now
            self.last_finished = finished
        if self.max_lifetime_seconds and now - self.booted >= self.max_lifetime_seconds:
            return f"the instance reached its maximum lifetime of {self.max_lifetime_seconds / 3600:g} h"
        if self.idle_seconds and now - self.last_activity >= self.idle_seconds:
            return f"no requests for {(now - self.last_activity) / 60:.0f} min (limit {self.idle_seconds / 60:g} min)"
        return None


def scrape(url: str) -> tuple[float, float] | None:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return read_activity(response.read().decode("utf-8", "replace"))
    except (urllib.error.URLError, OSError, ValueError):
        return None  # not up yet, or restarting: no use seen


def terminate(api_url: str, api_key: str, instance_id: str) -> None:
    request = urllib.request.Request(
        api_url.rstrip("/") + "/instance-operations/terminate", method="POST",
        data=json.dumps({"instance_ids": [instance_id]}).encode(),
        headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        response.read()


def since_boot() -> float:
    """Seconds since the machine booted, suspended time included: the instance's billed lifetime."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def run(environ: dict[str, str], clock: Callable[[], float] = since_boot, booted: float = 0.0,
        sleep: Callable[[float], None] = time.sleep, polls: int | None = None) -> str | None:
    """Poll until a limit is reached, then terminate the instance (retrying until Lambda accepts).
    Returns the reason; `polls` bounds the loop for tests."""
    watchdog = Watchdog(idle_seconds=float(environ.get("DREAMSEED_IDLE_SECONDS", "3600")),
                        max_lifetime_seconds=float(environ.get("DREAMSEED_MAX_LIFETIME_SECONDS", "86400")),
                        booted=booted, last_activity=clock())
    metrics_url = environ.get("DREAMSEED_METRICS_URL", "http://127.0.0.1:8000/metrics")
    poll = float(environ.get("DREAMSEED_POLL_SECONDS", "60"))
    count = 0
    while polls is None or count < polls:
        count += 1
        reason = watchdog.observe(clock(), scrape(metrics_url))
        if reason is not None:
            print(f"idle_watchdog: terminating instance {environ['LAMBDA_INSTANCE_ID']}: {reason}", flush=True)
            while True:
                try:
                    terminate(environ["LAMBDA_API_URL"], environ["LAMBDA_API_KEY"], environ["LAMBDA_INSTANCE_ID"])
                    return reason
                except (urllib.error.URLError, OSError) as exc:
                    print(f"idle_watchdog: terminate failed ({exc}); retrying", file=sys.stderr, flush=True)
                    sleep(poll)
        sleep(poll)
    return None


if __name__ == "__main__":
    run(dict(os.environ))
