"""Parameter servers: shard processes holding versioned, durable slices of model weights.

store.py is the on-disk format (safetensors + checksummed manifest, atomic writes);
shard.py the shard's event loop (stage/commit/fetch/rollback on a ROUTER, announcements
on a PUB). Placement (which shard owns which piece) is protocol/placement.py.
"""
