"""The OpenAI-compatible server (`dllm-jax serve`): `app.create_app(session)` builds the
FastAPI app; `engine.Engine` is the continuous-batching scheduler, `lanes` what it runs (a
batch decoded block by block, or one whole `generate` call), `blocks` the block-level
compiled decode (every row at its own block), `protocol` the request models and their
validation, `responses` the response bodies and the stream's chunks, `streaming` one
streamed request, `metrics` the Prometheus text, `static/index.html` the demo page (`GET /`).

Needs the `serve` extra (fastapi, uvicorn, sse-starlette): `pip install 'dllm-jax[serve]'`.
"""
