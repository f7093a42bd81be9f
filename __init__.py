"""sept: select a task-specific pre-training subset from a huge WebDataset pool, then pre-train on it.

Stages live in subpackages: ``sept.data`` (WebDataset I/O, identity, demo corpus),
``sept.index`` (FAISS + Zarr), ``sept.cluster`` (Ray), ``sept.training`` (SSL, DDP, submitit).
"""

__version__ = "0.1.0"
