"""The one fact the paged KV cache (model.kv_cache, torch) and the block manager
(server.engine.kv_blocks, pure Python) share, kept free of torch so that both can import it."""

NULL_BLOCK = 0  # never handed to a sequence: pads block tables, and padding rows write there
