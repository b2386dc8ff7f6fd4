"""The actors: separate processes that intercept, decide, account and track connections."""
