"""Metrics, logging, and the Grafana dashboard and alert rules as files."""
