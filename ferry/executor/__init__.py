"""Executors: what sits between the engine and the model runner(s).

``base.py`` is the interface the engine uses (no torch); ``in_process.py`` runs one
``ModelRunner`` in the engine's process. A torch.distributed executor with a worker per
GPU (tensor parallelism) implements the same interface and receives the same plain-data
``SchedulerOutput`` messages.
"""
