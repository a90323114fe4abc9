"""The serving engine: one thread owns the model; an asyncio front feeds it and streams results."""
