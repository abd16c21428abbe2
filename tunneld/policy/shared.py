# -*- test-case-name: tests.test_shared_limits -*-
"""
Per-tunnel rate limits that hold for the whole cluster, decided at once.

The state backend's token bucket (one atomic script in Redis, on Redis's
clock) is the bank: every token an edge spends comes from it, so the
tunnel's rate holds whichever edges the requests arrive at.  Asking Redis
for every request would put a round trip in front of each one and make
admission wait, so each edge keeps a small account per tunnel instead:

  - a request is admitted while the account's debt is under its target;
    admitting it spends one token, on credit when the account is empty (so
    a tunnel under its limit never waits for Redis, nor is refused for want
    of an answer);
  - once the account is down to half its target (a twentieth of a second's
    worth of the rate, at least one token), one take of C{target - balance}
    tokens goes to the bank: a grant pays the debt and refills the account,
    a refusal says when to ask again.  So the bank hears from an edge about
    once per half a target of requests (at most some forty times a second
    per tunnel at its limit), never once per request;
  - a request that finds the account that deep in debt is refused with
    C{rate_limited} and a C{Retry-After}.

So an edge admits at most C{target} requests more than the bank granted it
(its debt), and holds at most C{target} tokens unspent: over a window the
cluster admits the bank's C{burst + rate * seconds} within twice the target
per edge (two tokens per edge at 20 requests a second).  When the store is unreachable the backend's verdicts come from a local
bucket holding this edge's share of the rate (degraded, counted here and
logged by the store); when it returns, the bank decides again.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from tunneld.interfaces import IStateBackend, TokenVerdict

__all__ = ["SharedBuckets"]

# Tokens an account keeps in hand: this many seconds' worth of the rate.
_PREFETCH_SECONDS = 0.05


class _Account:
    __slots__ = ("balance", "asking", "ask_after", "rate", "burst")

    def __init__(self, rate: float, burst: float) -> None:
        self.balance = 0  # tokens in hand; below 0: admitted on credit, unpaid
        self.asking = False  # a take is on its way to the bank
        self.ask_after = 0.0  # the bank said no: not before this time
        self.rate = rate
        self.burst = burst


class SharedBuckets:
    """Tunnel buckets kept in C{backend}, spent through local accounts (module docstring)."""

    log = Logger()

    def __init__(
        self, backend: IStateBackend, clock: IReactorTime, max_size: int = 100_000,
        prefix: str = "tunnel-rate:",
    ) -> None:
        self.backend = backend
        self.clock = clock
        self.max_size = max_size
        self.prefix = prefix
        self.accounts: OrderedDict[str, _Account] = OrderedDict()
        self.granted = 0  # tokens the bank granted this edge
        self.degraded = 0  # takes decided locally, the store being unreachable

    def __len__(self) -> int:
        return len(self.accounts)

    def take(self, key: str, rate: float, burst: float) -> float:
        """0.0: admitted; otherwise the seconds to wait before trying again."""
        account = self.accounts.get(key)
        if account is None:
            account = self.accounts[key] = _Account(rate, burst)
            while len(self.accounts) > self.max_size:
                self.accounts.popitem(last=False)
        else:
            self.accounts.move_to_end(key)
            account.rate, account.burst = rate, burst
        now = self.clock.seconds()
        if account.balance > -self._target(account):
            account.balance -= 1
            wait = 0.0
        else:
            wait = max(account.ask_after - now, 1.0 / rate)
        self._ask(key, account, now)
        return wait

    def _target(self, account: _Account) -> int:
        return max(1, min(math.ceil(account.rate * _PREFETCH_SECONDS), int(account.burst) - 1))

    def _ask(self, key: str, account: _Account, now: float) -> None:
        if account.asking or now < account.ask_after:
            return
        target = self._target(account)
        if account.balance > target // 2:
            return  # enough in hand: ask in batches, not for each request
        cost = target - account.balance
        cost = min(cost, max(1, int(account.burst)))
        account.asking = True
        d = self.backend.take_tokens(self.prefix + key, cost, account.rate, account.burst)
        d.addCallbacks(
            self._answered, self._failed, callbackArgs=(key, account, cost), errbackArgs=(account,)
        )

    def _answered(self, verdict: TokenVerdict, key: str, account: _Account, cost: int) -> None:
        account.asking = False
        if verdict.degraded:
            self.degraded += 1
        if verdict.allowed:
            account.balance += cost
            self.granted += cost
            if self.accounts.get(key) is account:
                self._ask(key, account, self.clock.seconds())
        else:
            account.ask_after = self.clock.seconds() + max(verdict.retry_after, 0.001)

    def _failed(self, failure: Failure, account: _Account) -> None:
        # take_tokens never fails by contract; a bug must not wedge the account.
        account.asking = False
        account.ask_after = self.clock.seconds() + 1.0
        self.log.failure("taking tokens from the state backend failed", failure)

    def snapshot(self) -> dict[str, Any]:
        return {"accounts": len(self.accounts), "granted": self.granted, "degraded": self.degraded}
