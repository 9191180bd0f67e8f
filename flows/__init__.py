"""Prefect flows, deployments and the `mnistops` CLI: the only package that imports prefect."""
