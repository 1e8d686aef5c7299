"""Load test of the real service: ``python -m bench.load [options]`` from the repository root (``make load``).

``seed.py`` builds a tiny Llama (cached) and fills a fresh data dir with stored jobs, their events and
training files through the store layer, before the server starts. ``server.py`` runs the real server
(``python -m sqft_service.cli serve``) as a subprocess with an API key. ``traffic.py`` runs the
concurrent clients (asyncio + httpx), each a seeded mix of uploads, job creation, job lists (first and
deeper pages), job retrieval, job events, file lists and file retrieval; it records every request,
cancels the jobs the run created, and verifies the result: no error of any kind, every created file
and job stored exactly once, the listings complete and free of duplicates, the server still healthy.
``report.py`` computes per-route latency percentiles and writes the markdown table and the JSON
(``bench/results/<date>-load-<host>.json``).

``tests/integration/test_concurrency.py`` runs the same harness, small, in ``make test``.
"""
