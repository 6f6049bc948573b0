"""What both renderers of /metrics write alike: the one-shot collector
(metrics.KsbpfCollector, through prometheus_client) and the daemon's
scraper (scrape.Scraper, its own text).  Here so that neither imports the
other."""

from __future__ import annotations

from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import generate_latest
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily

KERNEL_FEATURE_HELP = ("1 when the running kernel has the BPF feature (a probe at start; `ksbpf status` says what "
                       "ksbpf does without each)")


@lru_cache(maxsize=1)
def ksbpf_version() -> str:
    try:
        return version("ksbpf")
    except PackageNotFoundError:
        return "unknown"


def verify_metrics(verifier):
    """The daemon's zero-traffic check (ksbpf/daemon/verifier.py): failing
    findings by scope and check (a series only while a check fails: a
    thousand pods pass fifteen checks each), how many runs completed, and
    when nothing last failed."""
    failures = GaugeMetricFamily("ksbpf_verify_failures", "Failed findings of the last zero-traffic check "
                                 "(ksbpf verify) by scope and check; absent while the check passes",
                                 labels=["scope", "check"])
    for (scope, chk), n in sorted(dict(verifier.failures).items()):
        if n:
            failures.add_metric([scope, chk], n)
    yield failures
    yield CounterMetricFamily("ksbpf_verify_runs", "Zero-traffic checks of every scope the daemon completed",
                              value=verifier.runs)
    if verifier.last_success is not None:
        yield GaugeMetricFamily("ksbpf_verify_last_success_timestamp_seconds", "When a zero-traffic check of every "
                                "scope last found no failure (Unix time)", value=verifier.last_success)


def verify_text(verifier) -> str:
    """verify_metrics as exposition text, for the scraper that writes its own."""
    class _Verify:
        def collect(self):
            return verify_metrics(verifier)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Verify())
    return generate_latest(reg).decode()
