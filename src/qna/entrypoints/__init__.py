"""The ways in: the `qna` command, the HTTP API, and the Python API."""
