"""Retry policy per capability: how many attempts, how long to wait, how long one may take.

Heal and export work (``export_generator``, ``export_healer``) gets more attempts and longer
waits than interactive work. ``MOLAR_LLM_RETRY_POLICIES`` overrides any field for one
capability or for all (``"*"``). The policy only decides; the runner records the decision in
SQL and the scheduler (:mod:`tasks.scheduler`) publishes the job again when it is due.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields, replace
from typing import Any

from broker.capabilities import CAPABILITIES
from broker.settings import Settings
from workers.errors import ProviderError

HEAL_AND_EXPORT = frozenset({"export_generator", "export_healer"})
ALL = "*"


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    base_backoff_s: float
    max_backoff_s: float
    jitter_ratio: float
    attempt_deadline_s: float
    # A provider hint (Retry-After) above this fails the job instead of holding it.
    max_retry_after_s: float

    def backoff_s(self, failures: int, rng: random.Random) -> float:
        """Exponential backoff after ``failures`` failed attempts, spread by the jitter."""
        raw = min(self.max_backoff_s, self.base_backoff_s * 2.0 ** max(failures - 1, 0))
        spread = raw * self.jitter_ratio
        return max(raw + rng.uniform(-spread, spread), 0.0)


@dataclass(frozen=True)
class RetryDecision:
    """Retry after ``delay_s``, or give up with ``error`` as the job's error."""

    retry: bool
    delay_s: float
    error: dict[str, Any]


def default_policy(capability: str, attempt_deadline_s: float) -> RetryPolicy:
    """Built-in defaults: background heal and export work can afford to wait and try more."""
    if capability in HEAL_AND_EXPORT:
        return RetryPolicy(max_attempts=8, base_backoff_s=2.0, max_backoff_s=300.0,
                           jitter_ratio=0.2, attempt_deadline_s=attempt_deadline_s,
                           max_retry_after_s=600.0)
    return RetryPolicy(max_attempts=3, base_backoff_s=0.5, max_backoff_s=30.0, jitter_ratio=0.2,
                       attempt_deadline_s=attempt_deadline_s, max_retry_after_s=60.0)


def decide(policy: RetryPolicy, exc: ProviderError, attempts_made: int,
           rng: random.Random) -> RetryDecision:
    """What to do after attempt ``attempts_made`` (counted since the last manual retry) failed."""
    error = dict(exc.to_error(), attempts=attempts_made)
    if not exc.retryable:
        return RetryDecision(False, 0.0, error)
    if attempts_made >= policy.max_attempts:
        error["message"] = f"gave up after {attempts_made} attempts; last: {exc.message}"
        return RetryDecision(False, 0.0, error)
    hint = exc.retry_after_s
    if hint is None:
        return RetryDecision(True, policy.backoff_s(attempts_made, rng), error)
    if hint > policy.max_retry_after_s:
        error.update(
            code="provider_rate_limited",
            message=f"the provider asked to wait {hint:.1f}s, above the ceiling of "
            f"{policy.max_retry_after_s:.1f}s; failing now rather than holding the job "
            f"(raise max_retry_after_s in MOLAR_LLM_RETRY_POLICIES to wait longer). "
            f"Provider said: {exc.message}",
        )
        return RetryDecision(False, 0.0, error)
    # Never sooner than the provider asked; the jitter only spreads callers later.
    return RetryDecision(True, hint + rng.uniform(0, hint * policy.jitter_ratio), error)


class RetryPolicies:
    """The policy of every capability, checked once when a worker starts."""

    def __init__(self, by_capability: dict[str, RetryPolicy]):
        self._by_capability = by_capability

    def for_capability(self, capability: str) -> RetryPolicy:
        return self._by_capability[capability]

    @property
    def max_attempt_deadline_s(self) -> float:
        return max(p.attempt_deadline_s for p in self._by_capability.values())

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicies:
        overrides = settings.retry_policies
        for key in overrides:
            if key != ALL and key not in CAPABILITIES:
                raise ValueError(
                    f"MOLAR_LLM_RETRY_POLICIES names unknown capability {key!r}; expected "
                    f"'*' or one of: {', '.join(CAPABILITIES)}"
                )
        policies = {
            cap: _policy_for(cap, settings, overrides.get(ALL, {}), overrides.get(cap, {}))
            for cap in CAPABILITIES
        }
        return cls(policies)


def _policy_for(capability: str, settings: Settings, *layers: dict[str, float]) -> RetryPolicy:
    policy = default_policy(capability, settings.attempt_deadline_s)
    known = {f.name for f in fields(RetryPolicy)}
    for layer in layers:
        unknown = sorted(set(layer) - known)
        if unknown:
            raise ValueError(
                f"MOLAR_LLM_RETRY_POLICIES: unknown field(s) {', '.join(unknown)}; expected: "
                f"{', '.join(sorted(known))}"
            )
        values: dict[str, Any] = dict(layer)
        if "max_attempts" in values:
            values["max_attempts"] = int(values["max_attempts"])
        policy = replace(policy, **values)
    _check(capability, policy, settings)
    return policy


def _check(capability: str, policy: RetryPolicy, settings: Settings) -> None:
    where = f"MOLAR_LLM_RETRY_POLICIES for {capability}"
    if policy.max_attempts < 1:
        raise ValueError(f"{where}: max_attempts must be at least 1")
    if min(policy.base_backoff_s, policy.max_backoff_s, policy.max_retry_after_s) < 0:
        raise ValueError(f"{where}: backoffs and max_retry_after_s must not be negative")
    if not 0 <= policy.jitter_ratio <= 1:
        raise ValueError(f"{where}: jitter_ratio must be within 0-1")
    if not 0 < policy.attempt_deadline_s < settings.task_time_limit_s:
        raise ValueError(
            f"{where}: attempt_deadline_s must be above 0 and below "
            f"MOLAR_LLM_TASK_TIME_LIMIT_S ({settings.task_time_limit_s})"
        )
