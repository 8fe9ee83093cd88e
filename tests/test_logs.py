"""Structured logs: JSON off a terminal, device fields on device lines, no secret ever written."""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import subprocess
import sys

import pytest

from amr import logs
from collector.inventory import Meter

SECRETS = [
    ("connecting to postgresql://amr:s3cr3t-pw@db.example:5432/amr", "s3cr3t-pw"),
    ("dsn host=db user=amr password=hunter2xx dbname=amr", "hunter2xx"),
    ("broker mqtt://gw:Pa55word@broker:8883 refused", "Pa55word"),
    ("GET /api/bills?token=abcdef123456&x=1", "abcdef123456"),
    ("header Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig", "eyJhbGciOiJIUzI1NiJ9"),
]


@pytest.fixture
def capture():
    buf = io.StringIO()
    handler = logs.setup("DEBUG", fmt="json", stream=buf)
    yield buf
    logging.getLogger().removeHandler(handler)


def lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def test_json_lines_carry_meter_and_bus(capture):
    meter = Meter(id="m-7", account="12", adapter="modbus_rtu", port="/dev/ttyS1", unit=3, preset="x")
    log = logging.getLogger("amr.poll")
    log.warning("timeout after %s s", 1.0, extra={"meter": meter.id, "bus": meter.bus_name, "adapter": meter.adapter})
    log.error("CRC mismatch", extra={"meter": "m-8", "bus": "rs485-a", "register": "1.8.0"})
    first, second = lines(capture)
    assert first["msg"] == "timeout after 1.0 s"
    assert (first["meter"], first["bus"], first["adapter"]) == ("m-7", "/dev/ttyS1", "modbus_rtu")
    assert first["level"] == "warning" and first["logger"] == "amr.poll"
    assert first["ts"].endswith("+00:00")
    assert (second["meter"], second["bus"], second["register"]) == ("m-8", "rs485-a", "1.8.0")


@pytest.mark.parametrize(("message", "secret"), SECRETS)
def test_no_secret_in_messages_or_arguments(capture, message, secret):
    log = logging.getLogger("amr.test")
    log.info(message)
    log.info("via argument: %s", message)
    log.info("in a field", extra={"url": message, "password": "plain-secret-1"})
    try:
        raise RuntimeError(message)
    except RuntimeError:
        log.exception("failed")
    text = capture.getvalue()
    assert secret not in text
    assert "plain-secret-1" not in text
    assert text.count("***") >= 4
    # what is not secret survives, so the line is still useful
    assert "via argument" in text and "failed" in text


def test_the_configured_passwords_are_masked_wherever_they_appear(capture, monkeypatch):
    """libpq quotes a malformed URL in shapes no pattern foresees: the process's own secrets go anyway."""
    monkeypatch.setenv("AMR_DATABASE_URL", "postgresql://amr:p@ss/w0rd-77@db/amr")  # unencoded @ and /
    monkeypatch.setenv("AMR_MQTT_PASSWORD", "mqtt-Secret-9")
    log = logging.getLogger("amr.test")
    log.warning("failed to resolve host 'ss/w0rd-77@db': unknown")  # the tail libpq took for a host
    log.warning("broker said no to mqtt-Secret-9")
    log.warning('invalid URI: "postgresql://amr:p@ss/w0rd-77@db/amr"')
    text = capture.getvalue()
    assert "w0rd-77" not in text and "mqtt-Secret-9" not in text and "p@ss" not in text
    assert "failed to resolve host" in text and "broker said no to ***" in text
    # short words are never taken for a secret: they would mask ordinary text everywhere
    monkeypatch.setenv("AMR_MQTT_PASSWORD", "db")
    log.warning("db is fine")
    assert lines(capture)[-1]["msg"] == "db is fine"


def test_redact_masks_the_secrets_it_is_given():
    assert logs.redact("host 'xyz-secret@h' unknown", ["xyz-secret@"]) == "host '***h' unknown"
    assert logs.redact("nothing here", ["absent-secret"]) == "nothing here"


def test_secretstr_field_is_redacted(capture):
    from pydantic import SecretStr

    logging.getLogger("amr.test").info("settings", extra={"mqtt": SecretStr("zz-top-secret")})
    assert "zz-top-secret" not in capture.getvalue()


def test_text_format_on_a_terminal_and_override():
    code = (
        "import logging; from amr import logs; logs.setup();"
        "logging.getLogger('amr').warning('hello', extra={'meter': 'm-1', 'bus': 'b1'})"
    )
    env = {k: v for k, v in os.environ.items() if k != "AMR_LOG_FORMAT"}
    # off a terminal: JSON
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=30)
    assert json.loads(out.stderr)["meter"] == "m-1"
    # on a terminal (a real pty): text with [bus meter]
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=slave, env=env)
    proc.wait(timeout=30)
    os.close(slave)
    got = os.read(master, 4096).decode()
    os.close(master)
    assert "[bus=b1 meter=m-1] hello" in got and not got.lstrip().startswith("{")
    # AMR_LOG_FORMAT=json wins over the terminal
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=slave, env={**env, "AMR_LOG_FORMAT": "json"})
    proc.wait(timeout=30)
    os.close(slave)
    got = os.read(master, 4096).decode()
    os.close(master)
    assert json.loads(got.strip())["bus"] == "b1"


def test_bad_log_format_is_a_clear_error():
    with pytest.raises(ValueError, match="AMR_LOG_FORMAT must be auto, json or text"):
        logs.choose_format("yaml", io.StringIO())


@pytest.mark.parametrize("fmt", ["auto", "json", "text"])
def test_log_lines_in_a_file_are_never_wrapped(tmp_path, fmt) -> None:
    """Off a terminal a log line is one line however long, whatever COLUMNS says (a parser reads it).

    A console library sized for a terminal (Rich's default is 80 columns
    when it finds none) would cut a line in two; the handler writes each
    record whole.
    """
    out = tmp_path / "stderr.log"
    message = "meter answered with a long payload " + "x" * 300
    code = (
        "import logging; from amr import logs; logs.setup('INFO'); "
        f"logging.getLogger('amr.test').warning({message!r}, extra={{'meter': 'sdm630-0001', 'bus': 'rs485-1'}})"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMR_")} | {"COLUMNS": "40",
                                                                               "AMR_LOG_FORMAT": fmt}
    with out.open("w") as err:
        subprocess.run([sys.executable, "-c", code], env=env, stderr=err, check=True, timeout=60)
    lines = out.read_text().splitlines()
    assert len(lines) == 1, lines
    assert message in lines[0] and "sdm630-0001" in lines[0]
    if fmt != "text":  # auto: a file is no terminal, so JSON
        assert json.loads(lines[0])["msg"] == message
