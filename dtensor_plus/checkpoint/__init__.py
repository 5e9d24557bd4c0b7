"""Sharded save and load with resharding (see save.py / load.py)."""
