"""SliME model: image slicing, vision stages, the Llama LLM and checkpoint loading.

This package knows nothing about HTTP or asyncio; `server/` drives it.
"""
