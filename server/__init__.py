"""SliME Serve: the OpenAI-compatible HTTP server."""
