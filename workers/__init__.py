"""Provider workers: wire-protocol clients, credential resolution and the job runner."""
