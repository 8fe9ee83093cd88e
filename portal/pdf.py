"""The account's printable documents as PDF: a month's bill and the receipt of a card payment.

Made with reportlab (BSD) and the DejaVu Sans font shipped in portal/fonts
(Bitstream Vera licence, which allows redistribution with its notice:
portal/fonts/LICENSE.txt), so Cyrillic text renders on a machine without any
system fonts. The text is real text, not drawn outlines: it can be searched,
copied and read back (the tests read it with pypdf).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import date
from pathlib import Path

from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.platypus import Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

from billing.account_data import BillVersion
from billing.payments import Receipt
from portal import formatting as fmt

FONTS = Path(__file__).resolve().parent / "fonts"
_registered = False


def _fonts() -> None:
    global _registered
    if not _registered:
        pdfmetrics.registerFont(TTFont("DejaVuSans", str(FONTS / "DejaVuSans.ttf")))
        pdfmetrics.registerFont(TTFont("DejaVuSans-Bold", str(FONTS / "DejaVuSans-Bold.ttf")))
        _registered = True


def _styles() -> tuple[ParagraphStyle, ParagraphStyle, ParagraphStyle]:
    _fonts()
    body = ParagraphStyle("body", fontName="DejaVuSans", fontSize=10, leading=13)
    h1 = ParagraphStyle("h1", parent=body, fontName="DejaVuSans-Bold", fontSize=15, leading=19, spaceAfter=6)
    h2 = ParagraphStyle("h2", parent=body, fontName="DejaVuSans-Bold", fontSize=11.5, leading=15, spaceBefore=8,
                        spaceAfter=4)
    return body, h1, h2


def _table(rows: Sequence[Sequence[str]], widths: Sequence[float], *, header: bool = True,
           right: Sequence[int] = ()) -> Table:
    t = Table([list(r) for r in rows], colWidths=list(widths), hAlign="LEFT")
    style = [("FONTNAME", (0, 0), (-1, -1), "DejaVuSans"), ("FONTSIZE", (0, 0), (-1, -1), 9),
             ("GRID", (0, 0), (-1, -1), 0.4, colors.grey), ("VALIGN", (0, 0), (-1, -1), "TOP")]
    if header:
        style += [("FONTNAME", (0, 0), (-1, 0), "DejaVuSans-Bold"), ("BACKGROUND", (0, 0), (-1, 0), colors.whitesmoke)]
    for c in right:
        style.append(("ALIGN", (c, 0), (c, -1), "RIGHT"))
    t.setStyle(TableStyle(style))
    return t


def _doc(title: str) -> tuple[io.BytesIO, SimpleDocTemplate]:
    buf = io.BytesIO()
    doc = SimpleDocTemplate(buf, pagesize=A4, leftMargin=18 * mm, rightMargin=18 * mm, topMargin=16 * mm,
                            bottomMargin=16 * mm, title=title, author="", subject=title, creator="amr portal")
    return buf, doc


def bill_pdf(*, supplier: str, account: str, period: date, versions: Sequence[BillVersion], due: date | None,
             address: str | None = None) -> bytes:
    """A month's bill: the latest version's lines, its total and due date, and every version's reason."""
    body, h1, h2 = _styles()
    latest = versions[-1]
    title = f"Счёт за {fmt.month(period)}, лицевой счёт {account}"
    buf, doc = _doc(title)
    story = [Paragraph("Счёт за электроэнергию", h1),
             _table([["Поставщик", supplier], ["Лицевой счёт", account], ["Расчётный период", fmt.month(period)],
                     ["Версия счёта", f"{latest.version} от {fmt.day(latest.created_at)}"],
                     ["Способ расчёта", fmt.label(fmt.BILL_METHODS, latest.method)],
                     ["Оплатить до", fmt.day(due) if due else "—"]], [55 * mm, 115 * mm], header=False),
             Paragraph("Начисления", h2)]
    rows = [["Зона", "Период", "кВт·ч", "Тариф, ₽/кВт·ч", "Сумма"]]
    for ln in latest.lines:
        zone = fmt.zone(ln.zone) + (f", ступень {ln.band}" if ln.band else "")
        rows.append([zone, f"{fmt.day(ln.date_from)} – {fmt.day(ln.date_to)}", fmt.number(ln.kwh, 3),
                     fmt.number(ln.rate, 2), fmt.money(ln.amount)])
    rows.append(["Итого", "", fmt.number(latest.kwh, 3), "", fmt.money(latest.total)])
    story.append(_table(rows, [38 * mm, 44 * mm, 26 * mm, 30 * mm, 32 * mm], right=(2, 3, 4)))
    if latest.estimated_kwh:
        story.append(Paragraph(f"Из них оценено (время потребления известно неточно): "
                               f"{fmt.kwh(latest.estimated_kwh, 3)}.", body))
    if len(versions) > 1:
        story.append(Paragraph("Версии счёта", h2))
        vrows = [["Версия", "Дата", "Сумма", "Причина"]]
        for v in versions:
            vrows.append([str(v.version), fmt.day(v.created_at), fmt.money(v.total),
                          Paragraph(v.reason or "—", body)])
        story.append(_table(vrows, [18 * mm, 26 * mm, 30 * mm, 96 * mm], right=(2,)))
    story += [Spacer(1, 6 * mm),
              Paragraph("Суммы указаны в рублях с НДС. Переплата за электроэнергию не засчитывается в оплату "
                        "пеней.", body)]
    doc.build(story)
    return buf.getvalue()


def receipt_pdf(r: Receipt) -> bytes:
    """The printable receipt of a card payment made in the account (the 54-FZ cheque's fields)."""
    _, h1, _ = _styles()
    title = f"Квитанция об оплате № {r.number:08d}"
    buf, doc = _doc(title)
    where = "адрес электронной почты" if r.contact_kind == "email" else "номер телефона"
    items = [["Что оплачено", "Сумма"]]
    if r.energy:
        items.append(["Оплата электроэнергии", fmt.money(r.energy)])
    if r.penalty:
        items.append(["Оплата пеней", fmt.money(r.penalty)])
    items.append(["Итого оплачено", fmt.money(r.amount)])
    story = [Paragraph("Квитанция об оплате", h1),
             _table([["Поставщик", r.supplier], ["Квитанция №", f"{r.number:08d}"],
                     ["Дата и время оплаты", fmt.moment(r.issued_at)], ["Лицевой счёт", r.account]],
                    [55 * mm, 115 * mm], header=False),
             Spacer(1, 4 * mm),
             _table(items, [120 * mm, 50 * mm], right=(1,)),
             Spacer(1, 4 * mm),
             _table([["Способ оплаты", "банковская карта, в личном кабинете"],
                     ["Электронный чек направлен на", f"{where} {r.contact}"],
                     ["Номер платежа у банка", f"{r.provider} {r.provider_payment_id}"]],
                    [55 * mm, 115 * mm], header=False)]
    doc.build(story)
    return buf.getvalue()
