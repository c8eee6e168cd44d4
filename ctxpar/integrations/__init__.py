"""Integrations of ctxpar's context parallelism into other training engines."""
