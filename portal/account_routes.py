"""The pages of a linked account (consumption, bills, payments, readings)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
