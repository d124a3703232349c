"""FX graph passes of the fsdp_compile backend, one per file (installed as ``fsdp_compile.passes``):

- ``hoist_markers``: Dynamo graph, parameter-use markers out of activation-checkpointed regions.
- ``insert_collectives``: Dynamo graph, param-use markers -> one gather per unit.
- ``bucketing``: Dynamo graph, adjacent small units' gathers -> one gather (``bucket_bytes``).
- ``reshard``: joint graph, tag each unit's gather chain to be recomputed (FULL_SHARD) or saved.
- ``reorder``: forward/backward graphs, prefetch each all-gather ``prefetch`` gathers early.
- ``defer_reduce_waits``: backward graphs (unless ``backend(overlap_reductions=False)``), each
  unit's reduction waits just before the next unit's is issued.
- ``schedule_check``: forward/backward/joint graphs, the collective schedule and its fingerprint.
"""
