"""The pieces of ``benchmarks/bench_fusion_quality.py``: sources, scoring, fusers, protocol, report.

Imported with ``benchmarks/`` on ``sys.path`` (the script's own folder when it runs).
"""
