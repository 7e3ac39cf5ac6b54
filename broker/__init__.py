"""molar-llm-broker: capability-tagged LLM jobs over per-capability Celery queues.

Public entry points for other Python services: :func:`broker.routing.resolve_routes`
and :class:`broker.client.BrokerClient`.
"""

__version__ = "0.1.0"
