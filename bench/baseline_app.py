"""The original design, as the comparison point: Flask + Flask-SQLAlchemy + openai, one
route, run under ``gunicorn -w 2`` (sync workers).

    python bench/baseline_app.py                    # create the table, once
    gunicorn -w 2 --chdir bench baseline_app:app   # serve

Settings: DATABASE_URL (postgresql://...), OPENAI_BASE_URL, OPENAI_API_KEY, QNA_MODEL.
"""

from __future__ import annotations

import os

import openai
from flask import Flask, Response, jsonify, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import Mapped, mapped_column


def _database_url() -> str:
    # The original used psycopg2; SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3.
    url = os.environ["DATABASE_URL"]
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix) :]
    return url


app = Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = _database_url()
db = SQLAlchemy(app)
client = openai.OpenAI(
    base_url=os.environ.get("OPENAI_BASE_URL"), api_key=os.environ.get("OPENAI_API_KEY", "x")
)
MODEL = os.environ.get("QNA_MODEL", "gpt-4o-mini")


class QnA(db.Model):  # type: ignore[name-defined,misc]
    # Flask-SQLAlchemy names the table after the class: "qn_a".
    id: Mapped[int] = mapped_column(primary_key=True)
    question: Mapped[str]
    answer: Mapped[str]


@app.post("/ask")
def ask() -> Response:
    question = request.get_json()["question"]
    completion = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}]
    )
    answer = completion.choices[0].message.content or ""
    db.session.add(QnA(question=question, answer=answer))
    db.session.commit()
    return jsonify({"question": question, "answer": answer})


@app.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


if __name__ == "__main__":
    with app.app_context():
        db.create_all()
