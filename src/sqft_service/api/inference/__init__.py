"""``/v1/chat/completions`` and ``/v1/completions`` on the embedded engine."""
