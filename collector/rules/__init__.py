"""The rules readings are judged by: validation (vee), interval derivation, the zone calendar.

Pure functions and data; no I/O beyond reading their own data files.
"""
