# qna: the HTTP API under gunicorn. Built by `docker compose up --build`.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
COPY migrations ./migrations
RUN pip install --no-cache-dir build && python -m build --wheel --outdir /dist

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN useradd --create-home --uid 10001 qna
COPY --from=build /dist/*.whl /tmp/
RUN pip install --no-cache-dir /tmp/*.whl && rm /tmp/*.whl
USER qna
WORKDIR /home/qna
EXPOSE 5000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/healthz', timeout=2)"
# The same command the tests run; it migrates the database before serving.
# --graceful-timeout above QNA_LLM_DEADLINE_S: run it with `docker stop -t 130`.
CMD ["qna", "serve", "--host", "0.0.0.0", "--port", "5000", "--graceful-timeout", "125"]
