"""Executors: what sits between the engine and the model runner(s).

``base.py`` is the interface the engine uses (no torch); ``in_process.py`` runs one
``ModelRunner`` in the engine's process; ``multiprocess.py`` makes the engine's process
rank 0 of a model spread over several ranks (tensor / pipeline parallel over
torch.distributed), whose workers (``rank_worker.py``, ``worker_process.py``) receive the
same plain-data ``SchedulerOutput`` messages.
"""
