"""TomoForge benchmark: our core against the tools a user would otherwise pick, on the same files.

Run ``.venv/bin/python -m bench.run [--size tiny|full] [--out bench/out]``; it writes
``results.md`` (a Markdown table with the machine it ran on) and prints it. See
:mod:`bench.run` for what is measured and how.

Modules: :mod:`bench.phantom` writes the CT phantom series, :mod:`bench.measure`
runs one measured operation per fresh process and reads its peak memory,
:mod:`bench.tasks` holds the operations themselves (ours and the reference tools),
:mod:`bench.browser` times a slider change to a painted image in headless Chromium,
:mod:`bench.served` starts the app for it (and for the load test and the browser tests).
"""
