"""LoRA serving: adapters in PEFT's format, loaded and swapped while the engine runs.

Pure Python (the engine imports these): ``request`` (LoRARequest), ``adapter_config``
(reading and checking ``adapter_config.json``), ``paths`` (where adapters may be loaded
from), ``registry`` (names, ids, in-flight counts, admission), ``watcher`` (a directory of
adapters). Torch (the runner's side): ``weights`` (tensors, checked against the model),
``slots`` (device slots, host LRU cache, the step's token mapping).
"""
