"""Why a reading was refused, in Russian, for the customer: every code the system can give.

The codes are those of `adapters.reading.REJECT_CODES` (what validation, the
store, decoders, imports and polls say) and those `billing.account_data`
gives before ingestion (the manual-entry checks). tests/test_portal_formatting.py
checks that every one of them has its text here, so a new code cannot reach a
customer as a bare English word.
"""

from __future__ import annotations

from collections.abc import Iterable

REJECT_TEXT: dict[str, str] = {
    # validation and the store
    "bad_meter_id": "номер прибора учёта указан неверно",
    "unknown_meter": "такого прибора учёта нет на этом лицевом счёте",
    "bad_register": "тариф (регистр) прибора указан неверно",
    "unknown_register": "у прибора учёта нет такого тарифа (регистра)",
    "not_numeric": "показание должно быть числом",
    "not_finite": "показание должно быть обычным числом",
    "negative": "показание не может быть отрицательным",
    "above_rollover": "показание больше, чем может показать счётчик",
    "bad_ts": "дата показания указана неверно",
    "naive_ts": "у даты показания не указан часовой пояс",
    "future_ts": "дата показания ещё не наступила",
    "before_installation": "дата показания раньше установки прибора учёта",
    "after_removal": "дата показания позже снятия прибора учёта",
    "implausible_ts": "дата показания неправдоподобна",
    "beyond_retention": "дата показания старше срока хранения данных",
    "conflict": "на эту дату уже есть другое показание этого тарифа",
    "store_error": "показание не удалось сохранить, повторите позже",
    "invalid": "показание не прошло проверку",
    # payload decoders
    "malformed": "данные повреждены",
    "too_deep": "данные слишком сложной структуры",
    "too_large": "данных слишком много",
    "type": "неверный тип данных",
    "ts": "неверное время в данных",
    "schema": "данные не соответствуют формату",
    "no_energy": "в данных нет показаний энергии",
    "unknown_topic": "данные пришли по неизвестному адресу",
    "unknown_device": "данные пришли от неизвестного устройства",
    "decode_error": "данные не удалось прочитать",
    "spool_damaged": "данные повреждены при хранении",
    "unit": "неверная единица измерения",
    # file imports
    "parse_error": "строку файла не удалось разобрать",
    "encoding": "неверная кодировка файла",
    "too_long": "строка файла слишком длинная",
    "truncated": "файл оборван",
    "implausible_value": "показание неправдоподобно",
    # polls
    "timeout": "прибор учёта не ответил вовремя",
    "deadline": "опрос прибора не уложился в срок",
    "crc": "ошибка контрольной суммы при опросе прибора",
    "exception": "прибор учёта ответил ошибкой",
    "decode": "ответ прибора не удалось прочитать",
    "refused": "прибор учёта отказал в соединении",
    "garbage": "прибор учёта прислал непонятный ответ",
    "clock": "часы прибора учёта расходятся с точным временем",
    "other": "показание не прошло проверку",
    # manual entry (billing.account_data.enter_readings)
    "invalid_time": "дата показания указана неверно",
    "meter_required": "укажите прибор учёта",
    "reading_in_future": "дата показания ещё не наступила",
    "reading_below_last": "показание меньше переданного ранее",
    "reading_implausible": "расход за это время больше возможного для прибора учёта; проверьте показание",
    "readings_entry_disabled": "показания этого лицевого счёта передаются автоматически",
    "reading_rejected": "показание не прошло проверку",
}


def reject_text(code: str) -> str:
    """The Russian reason of one code; an unknown code gets the general one."""
    return REJECT_TEXT.get(code, REJECT_TEXT["other"])


def reject_texts(codes: Iterable[str]) -> str:
    """Several codes as one sentence part, each reason once, in the order given."""
    out: list[str] = []
    for c in codes:
        t = reject_text(c)
        if t not in out:
            out.append(t)
    return "; ".join(out)
