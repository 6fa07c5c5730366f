"""Telemetry: metrics and measurements; watches, never drives."""
