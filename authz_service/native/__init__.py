"""The native fast path: a policy compiled into Envoy's own filters (jwt_authn, RBAC, local
replies), with ext_authz to the service for whatever those cannot decide exactly as it does.

``compile_policy`` (bootstrap.py) is the entry point; docs/native.md is the user's guide.
Nothing is imported here: the CLI parser imports ``arguments`` alone, without the compiler.
"""
