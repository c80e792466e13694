"""KV tiers: L1 pool, allocator, radix tree, L2 host pool, L3 disk store, copies, policy."""
