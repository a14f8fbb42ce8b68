"""Serving parts of TokenSelect: Prometheus metrics, ``GET /tokenselect/stats`` and the
scheduler-side reader of the decode counters (installed as ``sglang_tokenselect.server``).

- ``monitor``: ``DecodeMonitor``, host-side decode accounting and an off-path counter reader;
- ``metrics``: the ``sglang:tokenselect_*`` metrics and SGLang's scheduler collector with them;
- ``routes``: the stats route on SGLang's FastAPI app;
- ``stats``: snapshots, their JSON files and the arithmetic (hit rate, attended fraction);
- ``wiring``: what the plugin's ServerArgs hook sets for these.
"""
