"""The HTTP API: a Flask application over the same use cases as the CLI.

`qna.entrypoints.http.app.create_app` builds it; `server` runs it under gunicorn.
Nothing is imported here, so `server` can prepare the environment (metrics
directory) before the application modules load.
"""
