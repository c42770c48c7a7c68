"""Periodic jobs run by beat. Thin, like the tasks: they call services."""
