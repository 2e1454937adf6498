"""Training tasks: a model + its loss + its data -> a :class:`~dist_fair.train.task.TrainTask`,
registered by model name in ``dist_fair/model_registry.py`` (the one list of models, on the bottom
floor beside ``config.py``, which reads its names) (DESIGN.md, ``tasks/``).

- ``sequence_task.py``: the Intraformer / Clusformer over kNN sequences (METHODS.md §4).

The deep (fair) clustering tasks are in ``dist_fair/deep/task.py``. Nothing here is imported by
the models, losses or solvers: tasks sit above them and below the engine's callers.
"""
