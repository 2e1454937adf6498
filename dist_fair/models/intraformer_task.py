"""Moved to :mod:`dist_fair.tasks.sequence_task` (models must not import the training engine).

This alias keeps ``from dist_fair.models.intraformer_task import ...`` working for the
benchmarks until they import the new path; it will be removed then.
"""
from dist_fair.tasks.sequence_task import *  # noqa: F401,F403
from dist_fair.tasks.sequence_task import __all__  # noqa: F401
