"""Bank payment registries: `amr payments import|unmatched|match` against the real PostgreSQL.

Each file here is the kind a bank sends (cp1251 by default, `;`-separated,
a totals line last) or one that is not a registry; every test counts the
ledger rows afterwards, so "refused, nothing booked" is checked, not hoped.
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amr.errors import UserError
from amr.settings import get_settings
from billing import ledger, payment_commands, registry

NAME = "ИВАНОВ ИВАН ИВАНОВИЧ"
ADDRESS = "СПб, ул. Садовая, д. 1, кв. 2"


def line(op: str, account: str, amount: str, day: str = "01-10-2026", payer: str = NAME) -> str:
    return f"{day};10:15:30;9055/0123;{op};{account};{payer};{ADDRESS};092026;{amount}"


def registry_text(lines: list[str], count: int | None = None, total: str | None = None) -> str:
    if total is None:
        fields = [x.split(";") for x in lines]
        total = str(sum((Decimal(registry.parse_amount(f[8]) or 0) / 100 for f in fields if len(f) == 9),
                        Decimal("0.00")))
    return "\r\n".join([*lines, f"={len(lines) if count is None else count};{total};"]) + "\r\n"


@pytest.fixture
def accounts(conn: psycopg.Connection) -> list[str]:
    for acc in ("100", "200", "300"):
        conn.execute("INSERT INTO subscriber (account, metering, plan, category, area)"
                     " VALUES (%s, 'amr', 'single', 'gas_stove', 'urban')", (acc,))
    conn.commit()
    return ["100", "200", "300"]


@pytest.fixture
def cli_env(db_url: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AMR_DATABASE_URL", db_url)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    parser = argparse.ArgumentParser(prog="amr")
    payment_commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    return capsys.readouterr().out


def write(tmp_path: Path, text: str, encoding: str = "cp1251", name: str = "reestr.txt",
          bom: bool = False) -> Path:
    path = tmp_path / name
    path.write_bytes((registry.BOM if bom else b"") + text.encode(encoding))
    return path


def ledger_rows(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) FROM ledger_entry").fetchone()[0]


def energy(conn: psycopg.Connection, account: str) -> Decimal:
    return ledger.balance(conn, account)["energy"]


GOOD = [line("1001", "000100", "1 234,56"), line("1002", "200", "100.5", day="02.10.2026"),
        line("1003", "300", "0,44")]


def test_a_cp1251_registry_is_booked_on_its_operation_dates(conn, accounts, cli_env, tmp_path, capsys) -> None:
    path = write(tmp_path, registry_text(GOOD))
    out = run(["payments", "import", str(path), "--source", "sber"], capsys)
    assert "3 payments, 1335.50 (source sber, import 1): booked 3, duplicate 0, unmatched 0, refused 0" in out
    # leading zeros are not significant; Excel's "1 234,56" is 1234.56; each on its own date
    assert energy(conn, "100") == Decimal("-1234.56")
    assert energy(conn, "200") == Decimal("-100.50")
    [e] = ledger.entries(conn, "200")
    assert (e.kind, e.component, e.booked_on, e.period, e.source) == (
        "payment", "energy", date(2026, 10, 2), date(2026, 9, 1), "registry:sber")
    assert e.idempotency_key == "registry:sber:1002:energy"
    assert ledger.balance(conn, "100")["penalty"] == 0  # a registry line pays energy
    payer, address, status = conn.execute(
        "SELECT payer, address, status FROM registry_payment WHERE operation_id = '1001'").fetchone()
    assert (payer, address, status) == (NAME, ADDRESS, "booked")  # the Cyrillic read right
    f = conn.execute("SELECT name, source, rows, total, booked FROM registry_file").fetchone()
    assert f == ("reestr.txt", "sber", 3, Decimal("1335.50"), 3)


def test_reimporting_books_nothing_and_says_so(conn, accounts, cli_env, tmp_path, capsys) -> None:
    path = write(tmp_path, registry_text(GOOD))
    run(["payments", "import", str(path), "--source", "sber"], capsys)
    before = ledger_rows(conn)
    out = run(["payments", "import", str(path), "--source", "sber"], capsys)
    assert "booked 0, duplicate 3, unmatched 0, refused 0" in out
    assert "nothing new booked" in out and "imported before as import 1" in out
    assert ledger_rows(conn) == before == 3
    # another bank's operation 1001 is another payment
    out = run(["payments", "import", str(path), "--source", "post"], capsys)
    assert "booked 3" in out and ledger_rows(conn) == 6


def test_utf8_with_a_bom_is_recognised_and_cp866_when_declared(conn, accounts, cli_env, tmp_path,
                                                               capsys) -> None:
    path = write(tmp_path, registry_text(GOOD[:1]), encoding="utf-8", bom=True)
    out = run(["payments", "import", str(path), "--json"], capsys)
    result = json.loads(out)
    assert (result["booked"], result["source"]) == (1, "bank")
    assert conn.execute("SELECT payer FROM registry_payment").fetchone()[0] == NAME
    dos = write(tmp_path, registry_text([line("2001", "200", "50")]), encoding="cp866", name="dos.txt")
    assert json.loads(run(["payments", "import", str(dos), "--encoding", "cp866", "--json"], capsys))["booked"] == 1
    assert conn.execute("SELECT payer FROM registry_payment WHERE operation_id = '2001'").fetchone()[0] == NAME


@pytest.mark.parametrize(("make", "message"), [
    # the totals line says another count, another sum
    (lambda: registry_text(GOOD, count=4), "line 4: the totals line counts 4 payments, the file has 3"),
    (lambda: registry_text(GOOD, total="1335.51"),
     "line 4: the totals line sums to 1335.51, the payments add up to 1335.50"),
    # cut short: the last line is a payment, or half of one
    (lambda: "\r\n".join(GOOD) + "\r\n", "line 3: the file ends without a totals line"),
    (lambda: "\r\n".join([*GOOD, GOOD[0][:20]]), "line 4: the file ends without a totals line"),
    (lambda: registry_text([*GOOD[:2], GOOD[2][:30]]), "line 3: 4 fields, the layout 'default' has 9"),
    (lambda: registry_text([GOOD[0], line("1009", "200", "12,3,4")]), "line 2: amount '12,3,4' is not an amount"),
    (lambda: registry_text([GOOD[0], line("1009", "200", "-5")]), "line 2: amount '-5' is not an amount"),
    (lambda: registry_text([line("1009", "200", "5", day="31-02-2026"), GOOD[0]]),
     "line 1: operation date '31-02-2026' is not a date"),
    (lambda: registry_text([GOOD[0], "=1;1234,56", GOOD[1]]), "line 2: a totals line before the last line"),
    (lambda: "", "the file holds no totals line"),
])
def test_a_file_that_is_no_registry_is_refused_whole(make, message, conn, accounts, cli_env, tmp_path,
                                                     capsys) -> None:
    path = write(tmp_path, make())
    with pytest.raises(registry.RegistryRefused) as exc:
        run(["payments", "import", str(path)], capsys)
    assert message in str(exc.value)
    assert "refused, nothing booked" in str(exc.value)
    assert ledger_rows(conn) == 0
    assert conn.execute("SELECT count(*) FROM registry_payment").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM registry_file").fetchone()[0] == 0


def test_wrong_encodings_are_refused_with_the_line(conn, accounts, cli_env, tmp_path, capsys) -> None:
    text = registry_text([GOOD[0], line("1004", "200", "1", payer="СИДОРОВ")])
    cases = [
        (write(tmp_path, text, encoding="utf-8", name="u.txt"), [],
         "the file is UTF-8, not cp1251"),  # UTF-8 without a BOM, read as the default cp1251
        (write(tmp_path, text, name="w.txt"), ["--encoding", "utf-8"], "line 1: byte 0xc8 is not utf-8 text"),
        (write(tmp_path, text, name="w2.txt"), ["--encoding", "cp866"], "line 1: character"),
        (write(tmp_path, text, encoding="cp866", name="d.txt"), [], "line 1: character"),
        (write(tmp_path, text, encoding="utf-8", name="b.txt", bom=True), ["--encoding", "cp1251"],
         "byte-order mark, but cp1251 was declared"),
    ]
    for path, extra, message in cases:
        with pytest.raises(registry.RegistryRefused, match=message):
            run(["payments", "import", str(path), *extra], capsys)
    assert ledger_rows(conn) == 0


def test_an_unknown_account_waits_in_the_queue_until_matched(conn, accounts, cli_env, tmp_path,
                                                            capsys) -> None:
    path = write(tmp_path, registry_text([GOOD[0], line("1005", "0999", "300,00"),
                                          line("1006", "ЛС 12", "7")]))
    out = run(["payments", "import", str(path), "--source", "sber"], capsys)
    assert "booked 1, duplicate 0, unmatched 2, refused 0" in out
    assert "unmatched: line 2: no such account: 0999" in out
    assert "unmatched: line 3: not an account number: 'ЛС 12'" in out
    assert ledger_rows(conn) == 1
    queue = [json.loads(x) for x in run(["payments", "unmatched", "--json"], capsys).splitlines()]
    assert [(q["operation_id"], q["account_given"], q["energy"]) for q in queue] == [
        ("1005", "0999", "300.00"), ("1006", "ЛС 12", "7.00")]
    with pytest.raises(UserError, match="no subscriber with account 999"):
        run(["payments", "match", str(queue[0]["id"]), "--account", "999"], capsys)
    out = run(["payments", "match", str(queue[0]["id"]), "--account", "0300", "--by", "operator1"], capsys)
    assert "booked to account 300, matched by operator1" in out
    [e] = ledger.entries(conn, "300")
    assert (e.amount, e.booked_on, e.author, e.idempotency_key) == (
        Decimal("-300.00"), date(2026, 10, 1), "operator1", "registry:sber:1005:energy")
    with pytest.raises(UserError, match="booked already, to account 300 \\(matched by operator1\\)"):
        run(["payments", "match", str(queue[0]["id"]), "--account", "200"], capsys)
    assert [json.loads(x)["operation_id"] for x in run(["payments", "unmatched", "--json"], capsys).splitlines()] \
        == ["1006"]
    # the matched payment re-imported is a duplicate, not booked again
    out = run(["payments", "import", str(path), "--source", "sber"], capsys)
    assert "booked 0, duplicate 3, unmatched 0" in out
    assert ledger_rows(conn) == 2


def test_duplicate_operation_ids_within_a_file_and_across_files(conn, accounts, cli_env, tmp_path,
                                                               capsys) -> None:
    rows = [GOOD[0], GOOD[1], GOOD[0],  # the same payment twice in one file: a duplicate
            line("1002", "300", "100.5", day="02.10.2026")]  # the same id, another account: a clash
    out = run(["payments", "import", str(write(tmp_path, registry_text(rows))), "--source", "sber"], capsys)
    assert "booked 2, duplicate 1, unmatched 0, refused 1" in out
    assert "refused: line 4: operation 1002 is on line 2 as account 200, 2026-10-02, 100.50, here as account " \
           "300, 2026-10-02, 100.50: one operation id, two payments" in out
    assert energy(conn, "300") == 0 and energy(conn, "200") == Decimal("-100.50")
    # a second file: one repeat of an earlier payment, one clash with one, one new
    later = [GOOD[1], line("1001", "100", "1,00"), GOOD[2]]
    out = run(["payments", "import", str(write(tmp_path, registry_text(later), name="r2.txt")),
               "--source", "sber", "--json"], capsys)
    r = json.loads(out)
    assert (r["booked"], r["duplicate"], r["unmatched"], r["refused"]) == (1, 1, 0, 1)
    assert "operation 1001 was imported before (file 1 line 1, booked) as account 000100" in r["refusals"][0]["reason"]
    assert ledger_rows(conn) == 3
    assert energy(conn, "100") == Decimal("-1234.56")
    refused = conn.execute("SELECT refused, refusals->0->>'line' FROM registry_file WHERE id = 2").fetchone()
    assert refused == (1, "2")


def test_a_layout_is_data(conn, accounts, cli_env, tmp_path, capsys) -> None:
    layout = tmp_path / "post.toml"
    layout.write_text('name = "post"\nsource = "post"\nencoding = "utf-8"\nseparator = "|"\nheader_lines = 1\n'
                      'date_formats = ["%Y-%m-%d"]\n[columns]\noperation_id = 1\ndate = 2\naccount = 3\n'
                      'amount = 4\npenalty = 5\n[totals]\nprefix = "ИТОГО|"\ncount = 1\nsum = 2\n')
    text = "№|дата|лс|сумма|пени\n77|2026-10-05|100|10,00|2,50\n78|2026-10-05|200|5|\nИТОГО|2|17,50\n"
    out = run(["payments", "import", str(write(tmp_path, text, encoding="utf-8")), "--layout", str(layout)],
              capsys)
    assert "2 payments, 17.50 (source post" in out and "booked 2" in out
    assert ledger.balance(conn, "100") == {"energy": Decimal("-10.00"), "penalty": Decimal("-2.50")}
    bad = tmp_path / "bad.toml"
    bad.write_text('header_lines = -1\n[columns]\ndate = 0\nwhen = 2\n[totals]\nprefix = ""\nsum = 0\n')
    with pytest.raises(registry.LayoutError) as exc:
        registry.load_layout(bad)
    assert "key 'columns.date': a column number from 1" in str(exc.value)
    assert "key 'columns.when': unknown field" in str(exc.value)
    assert "key 'columns.account': missing" in str(exc.value)
    assert "key 'header_lines': the number of lines before the first payment, got -1" in str(exc.value)
    assert "key 'totals.prefix'" in str(exc.value) and "key 'totals.sum': a field number from 1" in str(exc.value)


OPS = [(f"{500 + i}", acc, amount) for i, (acc, amount) in enumerate(
    [("100", "10,00"), ("200", "0,01"), ("100", "1 000,99"), ("999", "5,55"), ("300", "77.7"), ("0200", "3")])]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.lists(st.lists(st.sampled_from(OPS), min_size=1, max_size=10), min_size=1, max_size=4))
def test_any_order_any_number_of_times_gives_the_same_balances(conn, accounts, files) -> None:
    """Files of the same payments, shuffled and repeated: each payment counts once, whatever came first."""
    layout = registry.load_layout()
    with conn.transaction(force_rollback=True):
        seen: set[tuple[str, str, str]] = set()
        for n, ops in enumerate(files):
            data = registry_text([line(op, acc, amount) for op, acc, amount in ops]).encode("cp1251")
            parsed = registry.parse(data, layout, name=f"r{n}.txt")
            r = registry.import_registry(conn, parsed, source="sber", layout=layout, author="test")
            assert r.refused == 0
            assert r.booked + r.unmatched == len(set(ops) - seen)
            seen |= set(ops)
        want: dict[str, Decimal] = {}
        for _op, acc, amount in seen:
            if acc != "999":
                key = acc.lstrip("0")
                want[key] = want.get(key, Decimal("0.00")) - Decimal(registry.parse_amount(amount) or 0) / 100
        got = {acc: b["energy"] for acc, b in ledger.balances(conn).items()}
        assert got == want
        assert all(b["penalty"] == 0 for b in ledger.balances(conn).values())
        assert conn.execute("SELECT count(*) FROM registry_payment WHERE status = 'unmatched'").fetchone()[0] \
            == (1 if any(acc == "999" for _o, acc, _a in seen) else 0)


def test_the_console_command_refuses_a_cut_file_with_status_2(conn, accounts, cli_env, tmp_path, capsys) -> None:
    from amr.cli import main

    path = write(tmp_path, "\r\n".join(GOOD))
    assert main(["payments", "import", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"amr payments: {path}: refused, nothing booked: line 3: the file ends without a "
                          "totals line")
    assert ledger_rows(conn) == 0
    assert main(["payments", "import", str(write(tmp_path, registry_text(GOOD), name="ok.txt"))]) == 0
    assert ledger_rows(conn) == 3


def test_a_ledger_key_taken_outside_any_registry_refuses_the_file(conn, accounts, tmp_path) -> None:
    ledger.post(conn, "200", "energy", "payment", Decimal("-1.00"), date(2026, 10, 2), reason="by hand",
                author="test", key="registry:sber:1002:energy")
    conn.commit()
    with pytest.raises(registry.RegistryRefused, match="a ledger entry keyed registry:sber:<operation id> exists"):
        registry.import_file(conn, write(tmp_path, registry_text(GOOD)), source="sber", author="test")
    conn.rollback()
    assert ledger_rows(conn) == 1
    assert conn.execute("SELECT count(*) FROM registry_payment").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM registry_file").fetchone()[0] == 0
