"""`kvscope serve`: an OpenAI-compatible HTTP server over one engine thread.

cli.py         flags, checks, uvicorn (and `--tui`)
server.py      the FastAPI app: routes, auth, limits, SSE, snapshot stream
runner.py      the engine thread: admission, per-request queues, aborts, snapshots
protocol.py    OpenAI request bodies -> GenRequest; OpenAI error bodies
render.py      reply / chunk bodies, usage, the `kvscope` extension
glm_parser.py  GLM <think> / <tool_call> output -> reasoning_content / tool_calls
metrics.py     Prometheus text from the telemetry snapshot
local_view.py  the inspector's engine object for `serve --tui`
"""
