"""`amr portal`: serve the customer account (личный кабинет) under uvicorn."""

from __future__ import annotations

import argparse
import logging

from amr.errors import UserError
from amr.settings import get_settings
from amr.storage import db

DESCRIPTION = """\
Serve the customer account's web pages (Russian, server-rendered, no JavaScript needed):
registration with an image captcha and e-mail confirmation, login, password recovery, the
profile, and the linked accounts' pages. It runs beside `amr api` on the same database.

Configuration (AMR_* environment variables):
  AMR_DATABASE_URL            the database (migrated by `amr db migrate`), as the role the pages
                              read with: in production a login role that is only a member of
                              amr_portal (views and narrow functions, nothing else)
  AMR_PORTAL_WRITER_URL       the role readings and card payments are written with (what
                              `amr collect` needs); empty: AMR_DATABASE_URL writes them too
  AMR_PORTAL_BASE_URL         the address customers open, the start of the links in e-mails
                              (default http://127.0.0.1:8090)
  AMR_SMTP_URL                smtp://[user:password@]host:port[?starttls=true] or smtps://...;
                              without it no e-mail is sent (registration says so)
  AMR_SMTP_FROM               the letters' From address
  AMR_PORTAL_SECURE_COOKIES   true (default): cookies only over HTTPS; set false only for
                              plain http://127.0.0.1 testing
Put it behind an HTTPS reverse proxy on the internet.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("portal", help="serve the customer account's web pages (uvicorn)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8090, help="port (default 8090)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="worker processes (default 1); pages are rendered in Python, so on a busy portal "
                        "give one per core: sessions, rate limits and the audit log are in the database, "
                        "shared by every worker")
    p.set_defaults(func=cmd_portal)


def cmd_portal(args: argparse.Namespace) -> int:
    """Start the pages; a malformed database URL stops it, a database that is down does not (503 pages)."""
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    settings = get_settings()
    db.check_url(settings.database_url)
    if settings.portal_writer_url:
        db.check_url(settings.portal_writer_url)
    if settings.smtp_url:
        from portal.mail import parse_smtp_url

        parse_smtp_url(settings.smtp_url)  # a malformed one is a message now, not at the first letter
    if not settings.portal_secure_cookies and not settings.portal_base_url.startswith(
            ("http://127.0.0.1", "http://localhost", "http://[::1]")):
        raise UserError("AMR_PORTAL_SECURE_COOKIES=false is for http://127.0.0.1 tests only, but "
                        f"AMR_PORTAL_BASE_URL is {settings.portal_base_url}: serve the portal over HTTPS "
                        "and keep secure cookies")
    import uvicorn

    from amr import logs
    from portal.app import create_app

    logs.setup("INFO", settings.log_format)
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    logging.getLogger("amr.portal").info(
        "serving the customer account on %s:%d with %d worker(s) (database %s, public address %s, mail %s)",
        args.host, args.port, args.workers, db.describe_database(settings.database_url),
        settings.portal_base_url, "on" if settings.smtp_url else "off")
    if args.workers == 1:
        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_config=None)
    else:  # each worker process builds the app from the same environment
        uvicorn.run("portal.app:create_app", factory=True, workers=args.workers, host=args.host, port=args.port,
                    log_config=None)
    return 0
