"""The Celery side: one app, one queue per capability, one task per capability."""
