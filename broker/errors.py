"""The errors the broker raises, each carrying its HTTP status and OpenAI error fields.

    BrokerError                   root; never raised itself
    ├── InvalidRequest            400  the caller's input is wrong (names the field)
    │   └── RawCredentialsRejected 400 a raw key where an integration id belongs
    ├── Unauthenticated           401  missing, wrong or expired credentials
    ├── SpendCapExceeded          402  hosted spend cap reached
    ├── PermissionDenied          403  authenticated but not allowed
    ├── NotFound                  404  unknown id, or another org's
    ├── Conflict                  409  the resource is in the wrong state
    ├── ServiceUnavailable        503  a dependency (database, queue) is down
    └── ConfigurationError        500  a deployment file or setting is wrong

The API turns each into ``{"error": {"message", "type", "param", "code"}}`` with its status.
"""

from __future__ import annotations


class BrokerError(Exception):
    status_code = 500
    error_type = "server_error"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code

    def to_body(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(BrokerError):
    status_code = 400
    error_type = "invalid_request_error"
    default_code = "invalid_request"


class RawCredentialsRejected(InvalidRequest):
    default_code = "raw_credentials_rejected"


class Unauthenticated(BrokerError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class SpendCapExceeded(BrokerError):
    status_code = 402
    error_type = "insufficient_quota"
    default_code = "spend_cap_exceeded"


class PermissionDenied(BrokerError):
    status_code = 403
    error_type = "permission_error"
    default_code = "permission_denied"


class NotFound(BrokerError):
    status_code = 404
    error_type = "not_found_error"
    default_code = "not_found"


class Conflict(BrokerError):
    status_code = 409
    error_type = "conflict_error"
    default_code = "conflict"


class ServiceUnavailable(BrokerError):
    status_code = 503
    error_type = "server_error"
    default_code = "service_unavailable"


class ConfigurationError(BrokerError):
    status_code = 500
    error_type = "server_error"
    default_code = "configuration_error"
