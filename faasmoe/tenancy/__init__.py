"""Tenants and their API keys, limits and admission, and the durable usage ledger (SQLite)."""
