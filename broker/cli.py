"""The ``molar-llm`` command line: serve, worker, flower, fake-upstream, migrate, demo."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import click

from broker.capabilities import parse_capability_list
from broker.logs import configure_logging
from broker.migrate import ensure_embedded_schema
from broker.settings import Settings, get_settings


def _start_on_chosen_allocator() -> None:
    """Restart on jemalloc when it should (:mod:`broker.allocator`); before anything else."""
    from broker.allocator import AllocatorError, restart_on_jemalloc

    try:
        restart_on_jemalloc()
    except AllocatorError as exc:
        raise click.ClickException(str(exc)) from None


def _log_allocator() -> None:
    import logging

    from broker.allocator import describe

    logging.getLogger("broker.allocator").info("memory allocator: %s", describe())


def _secure_start(settings: Settings) -> None:
    """Refuse unsafe secrets (production) and teach redaction the ones this process holds."""
    from broker.errors import ConfigurationError
    from broker.security import refuse_unsafe_secrets, register_process_secrets

    try:
        refuse_unsafe_secrets(settings)
    except ConfigurationError as exc:
        raise click.ClickException(exc.message) from None
    register_process_secrets(settings)


@click.group()
def main() -> None:
    """molar-llm-broker: capability-tagged LLM jobs over per-capability queues."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8787, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=int,
              help="API processes (uvicorn workers).")
def serve(host: str, port: int, workers: int) -> None:
    """Run the HTTP API."""
    _start_on_chosen_allocator()
    import uvicorn

    settings = get_settings()
    _secure_start(settings)
    configure_logging(settings.log_level, settings.log_format)
    _log_allocator()
    uvicorn.run(
        "broker.api.app:create_app", factory=True, host=host, port=port, workers=workers,
        loop="uvloop", http="httptools", access_log=False, log_config=None,
    )


@main.command()
@click.option("--capabilities", default="all", show_default=True,
              help="Comma-separated capability keys whose queues this worker consumes.")
@click.option("--concurrency", default=64, show_default=True, type=int,
              help="Provider calls in flight at once (threads; calls are network-bound).")
@click.option("--spare-threads", default=0, show_default=True, type=click.IntRange(min=0),
              help="Threads beyond --concurrency (at most as many): they claim jobs and write "
                   "answers and usage while --concurrency provider calls stay in flight.")
@click.option("--name", default=None, help="Worker node name (default: llm-<group>@<host>).")
@click.option("--loglevel", default=None, help="Log level (default: MOLAR_LLM_LOG_LEVEL).")
@click.option("--metrics-port", default=None, type=int,
              help="Serve this worker's Prometheus series on this port (default: off).")
def worker(capabilities: str, concurrency: int, spare_threads: int, name: str | None,
           loglevel: str | None, metrics_port: int | None) -> None:
    """Run a provider worker for some capability queues."""
    _start_on_chosen_allocator()
    from broker.capabilities import CAPABILITIES, queue_name

    try:
        caps = parse_capability_list(capabilities)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--capabilities") from None
    if spare_threads > concurrency:
        # More threads than calls would only add jobs waiting for a call slot (holding their
        # messages and leases) without adding calls.
        raise click.BadParameter(
            f"{spare_threads} is more than --concurrency ({concurrency}); give at most as "
            f"many spare threads as calls in flight", param_hint="--spare-threads")
    settings = get_settings()
    _secure_start(settings)
    configure_logging(loglevel or settings.log_level, settings.log_format)
    _log_allocator()
    from tasks.retry_policy import RetryPolicies

    try:
        RetryPolicies.from_settings(settings)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    ensure_embedded_schema(settings)
    # Importing the task module registers the tasks on the app.
    from tasks.llm import app, limit_provider_calls

    limit_provider_calls(concurrency if spare_threads else None)

    if metrics_port is not None:
        from broker.prometheus import serve_worker_metrics

        serve_worker_metrics(metrics_port)

    group = "all" if set(caps) == set(CAPABILITIES) else "+".join(caps)
    # JSON logs stay pure JSON lines: no start-up banner.
    quiet = ["--quiet"] if settings.log_format == "json" else []
    argv = [
        *quiet, "worker", "--pool", "threads", "--concurrency", str(concurrency + spare_threads),
        "--queues", ",".join(queue_name(c) for c in caps),
        "--hostname", name or f"llm-{group}@%h", "--events",
        "--loglevel", (loglevel or settings.log_level).upper(),
        "--without-mingle", "--without-gossip",
    ]
    app.worker_main(argv)


@main.command("fake-upstream")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8790, show_default=True, type=int)
@click.option("--latency-ms", default=0.0, show_default=True, type=float)
@click.option("--api-key", "api_keys", multiple=True,
              help="A key the fake accepts (repeatable). None given: any key is accepted.")
def fake_upstream(host: str, port: int, latency_ms: float, api_keys: tuple[str, ...]) -> None:
    """Run the fake OpenAI/Anthropic upstream used by tests, the demo and benchmarks."""
    from workers.fake_upstream import serve as serve_fake

    serve_fake(host, port, latency_ms=latency_ms, api_keys=api_keys)


@main.command()
@click.option("--address", default="127.0.0.1", show_default=True)
@click.option("--port", default=5555, show_default=True, type=int)
@click.option("--url-prefix", default="", help="Serve under this path (behind a proxy).")
@click.option("--no-auth", is_flag=True,
              help="Local development only: no basic auth, loopback address only.")
@click.option("--allow-control", is_flag=True,
              help="Enable Flower's control operations (shutdown, revoke, apply); off by default.")
def flower(address: str, port: int, url_prefix: str, no_auth: bool,
           allow_control: bool) -> None:
    """Run Flower on the configured broker (basic auth from MOLAR_LLM_FLOWER_BASIC_AUTH)."""
    from broker.flower import FlowerConfigError, FlowerOptions, parse_basic_auth, run_flower

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    try:
        options = FlowerOptions(
            address=address, port=port, url_prefix=url_prefix, no_auth=no_auth,
            allow_control=allow_control,
            basic_auth=parse_basic_auth(settings.flower_basic_auth.get_secret_value()),
        )
        from tasks.llm import app  # registered tasks show in Flower's task types

        run_flower(app, options)
    except FlowerConfigError as exc:
        raise click.UsageError(str(exc)) from None


@main.command()
def migrate() -> None:
    """Apply database migrations to MOLAR_LLM_DATABASE_URL."""
    from broker.migrate import upgrade

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    if settings.is_embedded:
        settings.var_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)
    click.echo(f"migrated {settings.resolved_database_url.split('://')[0]} database to head")


@contextmanager
def _operator_database_errors() -> Iterator[None]:
    """Turn a database that is missing or not migrated into one line an operator can act on."""
    from sqlalchemy.exc import OperationalError, ProgrammingError

    try:
        yield
    except (OperationalError, ProgrammingError) as exc:
        raise click.ClickException(
            f"the database is unreachable or not migrated ({type(exc.orig).__name__}); check "
            "MOLAR_LLM_DATABASE_URL and run `molar-llm migrate`"
        ) from None


@main.command("rotate-keys")
def rotate_keys() -> None:
    """Re-encrypt every stored credential under the newest MOLAR_LLM_ENCRYPTION_KEYS key."""
    from broker.errors import ConfigurationError
    from broker.integrations import rotate_stored_keys

    settings = get_settings()
    _secure_start(settings)
    configure_logging(settings.log_level, settings.log_format)
    ensure_embedded_schema(settings)
    try:
        with _operator_database_errors():
            count = rotate_stored_keys(settings)
    except ConfigurationError as exc:
        raise click.ClickException(exc.message + "; nothing was changed") from None
    click.echo(f"re-encrypted {count} stored credential(s) under the newest key; keys after "
               "the first in MOLAR_LLM_ENCRYPTION_KEYS can now be dropped")


@main.command()
@click.option("--org", default=None, help="Only this org's jobs.")
@click.option("--batch", default=None, help="Only this batch's items.")
@click.option("--capability", default=None, help="Only jobs of this capability.")
@click.option("--error-code", default=None, help="Only jobs whose error has this code.")
@click.option("--since", default=None,
              help="Finished at or after: ISO 8601, or an age such as 90m, 1h, 2d.")
@click.option("--until", default=None, help="Finished before: ISO 8601, or an age.")
@click.option("--include-cancelled", is_flag=True, help="Re-queue cancelled jobs as well.")
@click.option("--dry-run", is_flag=True, help="Print what would be re-queued; change nothing.")
def retry(org: str | None, batch: str | None, capability: str | None, error_code: str | None,
          since: str | None, until: str | None, include_cancelled: bool, dry_run: bool) -> None:
    """Re-queue failed jobs as new attempts, e.g. every failed export_healer job of the last hour:

    molar-llm retry --capability export_healer --since 1h
    """
    from broker.retry_cli import RetryFilter, run_retry

    try:
        where = RetryFilter.parse(org=org, batch=batch, capability=capability,
                                  error_code=error_code, since=since, until=until,
                                  include_cancelled=include_cancelled)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    settings = get_settings()
    configure_logging("WARNING", settings.log_format)
    ensure_embedded_schema(settings)
    with _operator_database_errors():
        for line in run_retry(settings, where, dry_run=dry_run):
            click.echo(line)


@main.command()
@click.option("--items", default=240, show_default=True, type=int,
              help="Batch size (at least 200).")
@click.option("--latency-ms", default=40.0, show_default=True, type=float,
              help="Fake upstream latency per call.")
def demo(items: int, latency_ms: float) -> None:
    """Run a Cartographer-style batch end to end on a local stack and print a report."""
    from broker.demo import run_demo

    sys.exit(run_demo(items=items, latency_ms=latency_ms))


if __name__ == "__main__":
    main()
