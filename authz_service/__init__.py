"""Envoy ext_authz sidecar that verifies Amazon Cognito machine-to-machine access tokens."""

__version__ = "0.1.0"
