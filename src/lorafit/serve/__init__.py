"""``lorafit serve``: one base model, many adapters, an HTTP API (needs the ``serve`` extra)."""
