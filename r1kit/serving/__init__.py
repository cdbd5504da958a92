"""`r1kit serve`: the OpenAI/DeepSeek-compatible HTTP front end over r1kit's engine (FastAPI + uvicorn).

app.py: routes, errors, body limit; protocol.py: request validation and response shapes; engine_loop.py: the
engine thread and its asyncio bridge; reasoning.py: detokenizing, stop strings, the reasoning/answer split;
server.py: model loading, uvicorn, signals, the `r1kit serve` arguments; page.html: the chat page at /.
Needs the `serve` extra (fastapi, uvicorn).
"""
