"""The OpenAI-compatible server (`dllm-jax serve`): `app.create_app(session)` builds the
FastAPI app; `engine.Engine` is the batching scheduler, `protocol` the request models and
their validation, `responses` the response / stream bodies, `metrics` the Prometheus text.

Needs the `serve` extra (fastapi, uvicorn, sse-starlette): `pip install 'dllm-jax[serve]'`.
"""
