"""Reproduce the paper's REDS4 / Vid4 / UDM10 CRF tables (scripts/reproduce_tables.py).

config.py (TablesConfig), run.py (the loop: test sets -> methods -> metrics), methods.py (bicubic or
an inference config), units.py (resumable per-clip scores), report.py (CSV, JSON, Markdown),
paper.py (the published numbers), figures.py (grid and temporal profile).
"""
