"""Registration, e-mail confirmation, login, logout, password recovery and the profile."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
