"""The customer account (личный кабинет): the web pages a household customer uses.

Server-rendered Russian pages on the project's own database and billing code:
users, sessions, linking accounts, consumption, bills, payments, readings.
It sits above `billing/` (it reads bills and the ledger) and below
`simulators/` (the demo serves it).
"""
