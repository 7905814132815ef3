"""The four model families; each model's ``forward(batch, generator)`` returns ``(loss, metrics)``
and ``encode(batch)`` returns frozen-probe features ``(B, N, C)`` tokens."""
