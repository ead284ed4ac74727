"""The schema runner behind ``migrate.py`` and the connection openers it shares with the drivers."""
