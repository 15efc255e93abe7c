"""Defaults shared by the workflows (imports nothing: the command line reads it before torch loads)."""

# The method used where a context is compressed before its question exists (the pipeline, `cakekv eval --protocol
# context-only`, the demo's several questions) and the user names none: its scores come from the context itself,
# not from an observation window that cannot hold the question.
QUERY_AGNOSTIC_METHOD = "kvzip"
