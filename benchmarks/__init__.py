"""Serving benchmarks for chatstream.

``python -m benchmarks.serving`` drives one running server with concurrent streaming clients;
``python -m benchmarks.compare <suite>`` starts servers one after another, runs that load against
each and writes the side-by-side figures to ``benchmarks/RESULTS.md``. See ``benchmarks/README.md``.
"""
