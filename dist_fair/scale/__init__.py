"""Scaling studies (``dist-fair scale``): a grid of sizes x workers x pipeline stages, every cell
measured (wall, CPU of the Ray processes, peak RSS, throughput), cached and resumable; per stage
a power-law fit ``t = a N^b`` with a confidence interval, parallel efficiency and an
extrapolation to larger N.

Modules, one job each:

- ``fit.py``: the statistics (least squares in log-log, t-based intervals, efficiency) - pure;
- ``measure.py``: CPU seconds and peak RSS of this driver and its Ray session's processes (psutil);
- ``stages.py``: one cell of one stage, through the library's own functions;
- ``sweep.py``: the grid, the cell cache, Ray (local, ``--address``, or a simulated ``--nodes`` cluster);
- ``report.py``: CSV, JSON, Markdown and the log-log PNG;
- ``cli.py``: the ``dist-fair scale`` command (standard library only at import).
"""
