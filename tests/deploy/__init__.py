"""Checks of what SREs run: dashboards, alert rules, compose, Kubernetes, a live Prometheus."""
