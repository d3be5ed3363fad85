"""Envoy ext_authz sidecar that verifies Amazon Cognito machine-to-machine access tokens."""

__version__ = "0.1.0"


def install_hint(extra: str) -> str:
    """How to add an optional extra. Nothing is published on a package index yet, so the ways that
    exist are a clone of the repository and a wheel built from it (docs/deploy.md, "Install")."""
    return (
        f"pip install '.[{extra}]' in a clone of the repository, or "
        f"pip install 'authz_service-{__version__}-py3-none-any.whl[{extra}]' from a built wheel"
    )
