"""Capability keys and the queue names derived from them: the one place both are spelled."""

from typing import Final

CAPABILITIES: Final[tuple[str, ...]] = (
    "planner",
    "grounding_tier0",
    "grounding_tier1_vlm",
    "export_generator",
    "export_healer",
    "passive_ux_vlm",
    "embeddings",
    "stagehand_planner",
    "stagehand_vlm",
)

#: Capabilities whose request is an OpenAI embeddings body; every other one takes chat completions.
EMBEDDING_CAPABILITIES: Final[frozenset[str]] = frozenset({"embeddings"})

QUEUE_PREFIX: Final = "llm."
TASK_NAME: Final = "llm.run_job"


def queue_name(capability: str) -> str:
    """The Celery queue that carries jobs of ``capability``."""
    return f"{QUEUE_PREFIX}{capability}"


def is_capability(value: object) -> bool:
    return isinstance(value, str) and value in CAPABILITIES


def unknown_capability_message(value: object) -> str:
    return f"unknown capability {value!r}; expected one of: {', '.join(CAPABILITIES)}"


def parse_capability_list(text: str) -> list[str]:
    """Parse ``a,b,c`` (or ``all``) into capability keys, refusing unknown ones."""
    if text.strip() in ("", "all", "*"):
        return list(CAPABILITIES)
    caps = [part.strip() for part in text.split(",") if part.strip()]
    for cap in caps:
        if cap not in CAPABILITIES:
            raise ValueError(unknown_capability_message(cap))
    return caps
