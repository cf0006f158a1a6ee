"""The HTTP frontend: the aiohttp app, OpenAI request parsing and response shapes, in-flight requests."""
