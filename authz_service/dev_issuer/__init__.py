"""A local stand-in for an Amazon Cognito user pool (``authz-service dev-issuer``), for
development and tests only: never part of the serving path.
"""
