"""FX graph passes of the fsdp_compile backend, one per file:

- ``insert_collectives``: Dynamo graph, param-use markers -> one gather per unit.
- ``reshard``: joint graph, tag each unit's gather chain to be recomputed (FULL_SHARD) or saved.
- ``schedule_check``: forward/backward graphs, the collective schedule and its fingerprint.
"""
