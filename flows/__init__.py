"""Prefect flows and deployments: thin wrappers over ``pigeon.stages`` (see ``prefect.yaml``)."""
