"""Training tasks: a model + its loss + its data -> a :class:`~dist_fair.train.task.TrainTask`,
registered by model name (DESIGN.md, ``tasks/``).

- ``registry.py``: the one list of models (``register_model``, ``get_model``, ``create_task``), read
  by the config's choices, ``dist-fair train`` and ``dist-fair run``;
- ``sequence_task.py``: the Intraformer / Clusformer over kNN sequences (METHODS.md §4).

The deep (fair) clustering tasks are in ``dist_fair/deep/task.py``. Nothing here is imported by
the models, losses or solvers: tasks sit above them and below the engine's callers.
"""
