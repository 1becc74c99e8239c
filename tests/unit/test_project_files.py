"""The README, docker-compose and Dockerfile stay true to the code."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from qna.config import Settings
from qna.entrypoints.cli import (
    EXIT_BROKEN_PIPE,
    EXIT_CANNOT_LISTEN,
    EXIT_CODES,
    EXIT_INTERRUPTED,
    cli,
)
from qna.entrypoints.http.openapi import openapi_document

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def env_names() -> set[str]:
    names = set()
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        choices = getattr(alias, "choices", [])
        names.add(str(choices[0]))
    return names


def test_every_setting_is_in_the_readme_table_and_nothing_else() -> None:
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", README, flags=re.MULTILINE))
    assert documented == env_names()


def test_every_exit_code_is_in_the_readme() -> None:
    documented = {int(code) for code in re.findall(r"^\| (\d+) \| ", README, flags=re.MULTILINE)}
    assert {code for _, code in EXIT_CODES} | {
        EXIT_CANNOT_LISTEN,
        EXIT_BROKEN_PIPE,
        EXIT_INTERRUPTED,
    } <= documented


def test_every_error_code_the_openapi_document_names_is_in_the_readme() -> None:
    document = openapi_document(
        max_question_length=10,
        max_body_bytes=1024,
        auth=True,
        rate_limited=True,
        host_checked=True,
    )
    named = {
        code
        for operations in document["paths"].values()
        for operation in operations.values()
        for status, response in operation["responses"].items()
        if int(status) >= 400
        for code in re.findall(r"`([a-z_]+)`", response["description"])
    }
    table = README.split("| status | codes |", 1)[1].split("\n\n", 1)[0]

    assert named <= set(re.findall(r"`([a-z_]+)`", table))


@pytest.mark.parametrize("auth", [False, True])
def test_every_operation_declares_its_paths_template_parameters(auth: bool) -> None:
    # OpenAPI requires it of each operation; OPTIONS on /questions/{id} did not, and
    # the document was invalid (schemathesis: "Path parameter 'id' is not defined").
    document = openapi_document(max_question_length=10, max_body_bytes=1024, auth=auth)
    for path, operations in document["paths"].items():
        templated = set(re.findall(r"{(\w+)}", path))
        for method, operation in operations.items():
            declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert declared == templated, (path, method)


def test_compose_runs_the_tested_serve_command_after_a_healthy_postgres() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    app, db = compose["services"]["app"], compose["services"]["db"]

    assert app["command"][:2] == ["qna", "serve"]
    assert app["depends_on"]["db"]["condition"] == "service_healthy"
    assert "127.0.0.1:5000:5000" in app["ports"]  # this machine only: no tokens set
    assert app["environment"]["QNA_ALLOWED_HOSTS"]  # 0.0.0.0 in the container
    # Docker kills after stop_grace_period: after qna's own drain, not in the middle.
    graceful = int(app["command"][app["command"].index("--graceful-timeout") + 1])
    assert graceful < int(app["stop_grace_period"].rstrip("s"))
    assert app["environment"]["DATABASE_URL"].startswith("postgresql://")
    assert db["image"] == "postgres:16"
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])
    help_text = CliRunner().invoke(cli, ["serve", "--help"]).output
    for option in (arg for arg in app["command"] if arg.startswith("--")):
        assert option in help_text


def test_dockerfile_runs_the_same_command_as_compose() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", dockerfile, flags=re.MULTILINE).group(1))  # type: ignore[union-attr]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())

    assert cmd == compose["services"]["app"]["command"]


def test_a_program_using_the_readme_api_passes_mypy_strict_without_pydantics_plugin(
    tmp_path: Path,
) -> None:
    # qna ships py.typed; a user's type checker has no pydantic plugin, and every
    # qna.Settings(...) call failed there ("Missing named argument" for each setting).
    program = tmp_path / "program.py"
    program.write_text(
        "import qna\n"
        "\n"
        "settings = qna.Settings(database_url='sqlite:///qna.db', QNA_MODEL='m')\n"
        "with qna.connect(settings, llm_max_attempts=2) as client:\n"
        "    record: qna.QnA = client.ask('What is 2+2?', fresh=True)\n"
        "    page: qna.Page = client.history(limit=10, status=qna.Status.ANSWERED)\n"
        "    same: qna.QnA = client.get(record.id)\n"
        "    answer: str | None = same.answer\n"
    )
    completed = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(program)],
        cwd=tmp_path,
        env={**os.environ, "MYPYPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
        check=False,
    )

    assert completed.returncode == 0, completed.stdout
    assert "Success: no issues found in 1 source file" in completed.stdout
